"""The projector (pixel-unshuffle + SwiGLU) and how its output lands in the LM's input sequence."""
import re

import pytest
import torch

from models.projector import Projector, pixel_unshuffle
from models.vlm import VLM


@pytest.mark.parametrize("factor, tokens", [(1, 196), (2, 49), (7, 4), (14, 1)])
def test_projector_output_shape(factor, tokens):
    proj = Projector(vision_dim=768, lm_dim=32, hidden_dim=16, unshuffle=factor)
    assert proj.gate.in_features == 768 * factor * factor
    assert proj(torch.randn(2, 196, 768)).shape == (2, tokens, 32)


def test_pixel_unshuffle_groups_2x2_neighbours():
    # A 4x4 grid of patches numbered row by row; feature d of patch n is 100 * d + n.
    n = torch.arange(16.0)
    x = torch.stack([n, 100 + n], dim=-1).unsqueeze(0)  # [1, 16, 2]
    out = pixel_unshuffle(x, 2)
    assert out.shape == (1, 4, 8)
    # token t holds its 2x2 block in row-major order (top-left, top-right, bottom-left, bottom-right),
    # each patch's features kept together
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    expected = torch.tensor([[v for p in block for v in (p, 100 + p)] for block in blocks], dtype=torch.float)
    assert torch.equal(out[0], expected)


def test_pixel_unshuffle_factor_one_is_identity():
    x = torch.randn(2, 9, 4)
    assert torch.equal(pixel_unshuffle(x, 1), x)


@pytest.mark.parametrize("n_tokens, factor, message", [
    (196, 3, "pixel_unshuffle=3 must divide the 14x14 patch grid"),
    (196, 4, "pixel_unshuffle=4 must divide the 14x14 patch grid"),
    (197, 2, "square"),  # e.g. a CLS token in front of the patches
])
def test_pixel_unshuffle_rejects_what_it_cannot_group(n_tokens, factor, message):
    with pytest.raises(ValueError, match=message):
        pixel_unshuffle(torch.randn(1, n_tokens, 8), factor)
    with pytest.raises(ValueError, match=message):
        Projector(8, 16, 16, unshuffle=factor)(torch.randn(1, n_tokens, 8))


# --- the joined model ---
@pytest.fixture
def model(tiny_cfg):
    m = VLM.from_config(tiny_cfg).eval()
    torch.nn.init.normal_(m.projector.down.weight, std=0.5)  # not near-zero, so a misplaced image would show
    return m


def test_image_positions_get_the_projected_image(model, tiny_batch):
    batch = tiny_batch(model)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    is_image = ids == model.image_token_id
    assert model.n_image_tokens == 4 and (is_image.sum(1) == 4).all()  # 32px / 8px patches, unshuffle 2
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        image = model.encode_images(pixels)
        text = model.lm.get_input_embeddings()(ids.masked_fill(is_image, 0))
    assert embeds.shape == (*ids.shape, model.lm.config.hidden_size)
    for row in range(len(ids)):
        assert torch.equal(embeds[row][is_image[row]], image[row])  # in order, each sample its own image
        assert torch.equal(embeds[row][~is_image[row]], text[row][~is_image[row]])
    assert not torch.equal(image[0], image[1])


@pytest.mark.parametrize("change", [-1, +1])
def test_image_token_count_mismatch_is_a_clear_error(model, tiny_batch, change):
    batch = tiny_batch(model)
    ids = batch["input_ids"].clone()
    first = int((ids[1] == model.image_token_id).nonzero()[0])
    if change < 0:
        ids[1, first] = model.tokenizer.pad_token_id  # one image position too few
    else:
        ids[1, first - 1] = model.image_token_id  # one too many
    counts = re.escape(str([4, 4 + change]))
    with pytest.raises(ValueError, match=rf"exactly 4 image positions .*got {counts}"):
        model(ids, batch["pixel_values"])

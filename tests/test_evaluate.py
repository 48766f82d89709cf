"""Dynamic evaluation: it never looks ahead, leaves the model as it was, and adapts to the text."""

import pytest
import torch

from shaq.evaluate import LN2, DynamicEval, dynamic_byte_nats, evaluate, evaluate_dynamic
from shaq.models import SHARNNConfig, build_model, model_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("shaq", SHARNNConfig.smoke(memory_len=48))


@pytest.mark.parametrize("name", ["shaq", "sharnn", "shatter"])
def test_the_score_of_a_byte_never_depends_on_later_bytes(name):
    torch.manual_seed(0)
    model = build_model(name, model_config(name, "smoke", memory_len=48))
    data = torch.randint(0, 256, (120,), dtype=torch.uint8)
    settings = DynamicEval(lr=3e-3)
    base = dynamic_byte_nats(model, data, bptt=16, settings=settings)[0]
    assert base.shape == (119,)
    for t in (5, 40, 100):  # inside a segment, at its start, in a later one
        changed = data.clone()
        changed[t] = (int(changed[t]) + 1) % 256
        nats = dynamic_byte_nats(model, changed, bptt=16, settings=settings)[0]
        # nats[i] scores byte i + 1: every byte before t scores the same, to the bit; byte t does
        # not.
        assert torch.equal(nats[: t - 1], base[: t - 1]), (
            f"changing byte {t} changed an earlier score"
        )
        assert nats[t - 1] != base[t - 1]


def test_with_rows_a_byte_depends_only_on_segments_already_scored():
    """Four rows read together: byte t of a row may depend on its row's bytes before t and on the
    segments before t's segment in every row (scored before the step that learned from them),
    never on a later byte of its own segment in another row, nor on later segments."""
    torch.manual_seed(0)
    model = build_model("shaq", SHARNNConfig.smoke(memory_len=48))
    data = torch.randint(0, 256, (4 * 60,), dtype=torch.uint8)
    settings = DynamicEval(lr=3e-3)
    base = dynamic_byte_nats(model, data, bptt=16, settings=settings, rows=4)
    assert base.shape == (4, 59)
    changed = data.clone()
    changed[2 * 60 + 20] += 1  # row 2, column 20: in the second segment (columns 16..31)
    nats = dynamic_byte_nats(model, changed, bptt=16, settings=settings, rows=4)
    assert torch.equal(nats[:, :16], base[:, :16])  # the first segment of every row
    assert torch.equal(
        nats[[0, 1, 3], :31], base[[0, 1, 3], :31]
    )  # the other rows, to the end of that segment
    assert torch.equal(nats[2, :19], base[2, :19]) and nats[2, 19] != base[2, 19]
    assert not torch.equal(nats[:, 31:], base[:, 31:])  # later segments learned from it


def test_the_model_is_left_as_it_was(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    evaluate_dynamic(
        model,
        torch.randint(0, 256, (200,), dtype=torch.uint8),
        bptt=32,
        settings=DynamicEval(lr=1e-2),
    )
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_it_learns_the_text_it_reads(model):
    """A random 40-byte pattern repeated: static evaluation cannot predict it beyond its memory's
    help; dynamic evaluation learns it and ends far lower."""
    torch.manual_seed(1)
    data = torch.randint(0, 256, (40,), dtype=torch.uint8).repeat(40)
    model_short = build_model(
        "shaq", SHARNNConfig.smoke(memory_len=8)
    )  # too short a memory to copy
    static = evaluate(model_short, data, batch_size=1, bptt=32)
    dynamic = evaluate_dynamic(model_short, data, bptt=32, settings=DynamicEval(lr=3e-3))
    assert dynamic < static - 1.0, (static, dynamic)
    nats = dynamic_byte_nats(model_short, data, bptt=32, settings=DynamicEval(lr=3e-3))
    assert nats.sum().item() / nats.numel() / LN2 == pytest.approx(dynamic)
    assert (
        evaluate_dynamic(model_short, data, bptt=32, settings=DynamicEval(lr=3e-3), rows=4)
        < static - 1.0
    )


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lr > 0"):
        DynamicEval(lr=0)
    with pytest.raises(ValueError, match="decay in"):
        DynamicEval(decay=1.0)

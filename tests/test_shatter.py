"""Shatter: the partitions, the attention against its equation, and ShatterLM's model contract."""

import math

import pytest
import torch
from torch.func import functional_call

import shaq
from shaq.models import SHAQ, SHARNN, ModelOutput, SHARNNConfig, State
from shaq.nn import ShatterAttention
from shaq.nn.shatter import partitions, relative_distances
from shaq.shatter import ShatterConfig, ShatterLM

# ----------------------------------------------------------------------------- the partitions


@pytest.mark.parametrize("n_partitions", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("horizon", [1, 7, 100])
def test_partitions_are_non_negative_and_sum_to_one_at_every_distance(n_partitions, horizon):
    r = torch.arange(-3, 3 * horizon + 5)
    pi = partitions(r, n_partitions, horizon)
    assert pi.shape == (n_partitions, r.numel())
    assert (pi >= 0).all()
    assert torch.allclose(pi.sum(0), torch.ones(r.numel()), atol=1e-6)
    # Distance 0 (and the future, counted as 0) is all in the first partition, R and beyond all in
    # the last one.
    assert torch.equal(pi[0, r <= 0], torch.ones(int((r <= 0).sum())))
    assert torch.equal(pi[-1, r >= horizon], torch.ones(int((r >= horizon).sum())))


def test_partitions_are_the_bernstein_basis_of_the_log_distance():
    # R = 15, r = 3: t = log 4 / log 16 = 1/2, so (1 - t)^2, 2 t (1 - t), t^2 = 1/4, 1/2, 1/4.
    pi = partitions(torch.tensor([3]), 3, 15, torch.float64)
    assert torch.allclose(pi.squeeze(1), torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    # Each middle partition peaks strictly between distance 0 and R, and the peaks come in order.
    pi = partitions(torch.arange(0, 101), 4, 100)
    peaks = pi.argmax(dim=1)
    assert peaks[0] == 0 and peaks[-1] == 100 and (peaks.diff() > 0).all()


def test_relative_distances_put_the_segment_after_the_memory():
    r = relative_distances(2, 5)  # memory of 3, segment of 2
    assert torch.equal(r, torch.tensor([[3, 2, 1, 0, -1], [4, 3, 2, 1, 0]]))


# ----------------------------------------------------------------------------- the attention


def random_attention(d=8, horizon=16, n_partitions=3, softmax=False, dtype=torch.float32, seed=0):
    """A ShatterAttention with weights large enough that scores and partitions matter."""
    torch.manual_seed(seed)
    attn = ShatterAttention(d, horizon, n_partitions, softmax=softmax).to(dtype).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    return attn


def attention_by_hand(attn: ShatterAttention, query, kv):
    """y_i = sum_k sum_j a_ij pi_k(i - j) (h_j W_v^k), looping over queries, keys and partitions."""
    B, T, d = query.shape
    M, K = kv.shape[1] - T, attn.n_partitions
    W_q, b_q = attn.query.weight, attn.query.bias
    W_v = [attn.value.weight[:, k * d : (k + 1) * d].T for k in range(K)]  # each [d, d]: h W_v^k
    y = torch.zeros(B, T, d, dtype=query.dtype)
    for i in range(T):
        q = query[:, i] @ W_q.T + b_q  # [B, d]
        visible = M + i + 1
        s = (kv[:, :visible] * q.unsqueeze(1)).sum(-1) / math.sqrt(d)  # [B, visible]
        a = s.softmax(-1) if attn.softmax else torch.sigmoid(s + attn.bias)
        for j in range(visible):
            pi = partitions(torch.tensor(M + i - j), K, attn.horizon, query.dtype)
            for k in range(K):
                y[:, i] += a[:, j, None] * pi[k] * (kv[:, j] @ W_v[k])
    return y


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("memory", [0, 5])
def test_attention_matches_its_equation(softmax, memory):
    attn = random_attention(softmax=softmax, horizon=6)  # distances up to 9 pass the horizon
    query = torch.randn(2, 5, 8)
    kv = torch.cat([torch.randn(2, memory, 8), query], dim=1)
    y, weights = attn(query, kv, return_weights=True)
    assert torch.allclose(y, attention_by_hand(attn, query, kv), atol=1e-4)
    assert weights.shape == (2, 5, memory + 5)
    assert torch.equal(weights[:, 0, memory + 1 :], torch.zeros(2, 4))  # the future has weight 0
    assert (weights[:, :, :memory] > 0).all()  # every query sees all the memory
    if softmax:
        assert torch.allclose(weights.sum(-1), torch.ones(2, 5))
    assert attn(query, kv)[1] is None


@pytest.mark.parametrize("softmax", [False, True])
def test_one_partition_is_plain_single_head_attention(softmax):
    attn = random_attention(n_partitions=1, softmax=softmax)
    assert attn.value.weight.shape == (8, 8)
    query = torch.randn(3, 6, 8)
    kv = torch.cat([torch.randn(3, 4, 8), query], dim=1)
    # The plain reference from the same weights: y = a V with V = kv W_v, no partitions.
    scores = (query @ attn.query.weight.T + attn.query.bias) @ kv.transpose(1, 2) / math.sqrt(8)
    future = torch.ones(6, 10, dtype=torch.bool).triu(diagonal=5)  # query i sees keys <= 4 + i
    scores = scores.masked_fill(future, float("-inf"))
    a = scores.softmax(-1) if softmax else torch.sigmoid(scores + attn.bias)
    expected = a @ (kv @ attn.value.weight.T)
    y, weights = attn(query, kv, return_weights=True)
    assert torch.allclose(weights, a)
    assert torch.allclose(y, expected, atol=1e-5)


def test_attention_is_causal():
    attn = random_attention()
    memory, query = torch.randn(2, 4, 8), torch.randn(2, 7, 8)
    base, _ = attn(query, torch.cat([memory, query], 1))
    for t in (0, 3, 6):
        changed = query.clone()
        changed[:, t] += 1.0
        y, _ = attn(changed, torch.cat([memory, changed], 1))
        assert torch.equal(y[:, :t], base[:, :t]), f"position {t} leaked into the past"
        assert not torch.allclose(y[:, t:], base[:, t:])


def test_attention_with_memory_equals_one_long_call():
    attn = random_attention(horizon=20)
    h = torch.randn(2, 12, 8)
    whole, _ = attn(h, h)
    first, _ = attn(h[:, :5], h[:, :5])
    second, _ = attn(h[:, 5:], h)  # memory h[:, :5], then the segment
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-5)


@pytest.mark.parametrize("softmax", [False, True])
def test_attention_gradients_through_the_partitions_in_float64(softmax):
    attn = random_attention(d=4, horizon=3, softmax=softmax, dtype=torch.float64)
    names = [name for name, _ in attn.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in attn.parameters()]
    query = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def y(query, memory, *params):
        kv = torch.cat([memory, query], 1)
        return functional_call(attn, dict(zip(names, params, strict=True)), (query, kv))[0]

    assert torch.autograd.gradcheck(y, (query, memory, *params))


def test_attention_dropout_only_in_training():
    attn = ShatterAttention(8, 16, dropout=0.5)
    query = torch.randn(2, 5, 8)
    attn.train()
    assert not torch.allclose(attn(query, query)[0], attn(query, query)[0])
    attn.eval()
    assert torch.equal(attn(query, query)[0], attn(query, query)[0])


def test_bad_attention_inputs_raise_clear_errors():
    attn = ShatterAttention(8, 16)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"query must be \[B, T, 8\]"):
        attn(torch.randn(2, 5, 6), x)
    with pytest.raises(ValueError, match=r"keys_values must be \[B, T, 8\]"):
        attn(x, torch.randn(10, 8))
    with pytest.raises(ValueError, match="same batch size"):
        attn(x, torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="at least the 5 segment positions"):
        attn(x, x[:, :4])
    with pytest.raises(ValueError, match="n_partitions and horizon >= 1"):
        ShatterAttention(8, 16, n_partitions=0)
    with pytest.raises(ValueError, match="n_partitions and horizon >= 1"):
        ShatterAttention(8, 0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ShatterAttention(8, 16, dropout=1.0)
    with pytest.raises(ValueError, match="horizon >= 1"):
        partitions(torch.arange(4), 3, 0)


def test_sigmoid_bias_starts_at_minus_log_horizon_and_softmax_has_none():
    assert ShatterAttention(8, 100).bias.item() == pytest.approx(-math.log(100))
    assert ShatterAttention(8, 100, softmax=True).bias is None


# ----------------------------------------------------------------------------- the model

TINY = dict(d_model=16, n_layers=2, ff_expansion=2, memory_len=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ShatterLM(ShatterConfig.smoke(**TINY)).eval()


def test_output_shapes_state_and_loss(model):
    torch.manual_seed(0)
    x, y = torch.randint(0, 256, (2, 2, 12))
    out = model(x, targets=y, return_attention=True)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 12, 256)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    assert torch.allclose(out.loss, expected)
    assert abs(out.loss.item() - math.log(256)) < 0.1  # untrained: about the uniform guess
    assert out.state.rnn == [] and [m.shape for m in out.state.memory] == [(2, 12, 16)] * 2
    assert [w.shape for w in out.attention] == [(2, 12, 12)] * 2
    assert model(x).attention is None and model(x).loss is None
    saved = State.from_dict(out.state.to_dict())
    assert torch.equal(model(x, state=saved).logits, model(x, state=out.state).logits)


@pytest.mark.parametrize("with_memory", [False, True])
def test_model_is_causal(model, with_memory):
    torch.manual_seed(1)
    state = model(torch.randint(0, 256, (2, 10))).state if with_memory else None
    x = torch.randint(0, 256, (2, 16))
    base = model(x, state=state).logits
    for t in (0, 5, 15):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        logits = model(changed, state=state).logits
        assert torch.equal(logits[:, :t], base[:, :t]), f"position {t} leaked into the past"
        assert not torch.allclose(logits[:, t:], base[:, t:])


def test_model_two_segments_equal_one_call(model):
    torch.manual_seed(2)
    x = torch.randint(0, 256, (3, 40))
    whole = model(x)
    first = model(x[:, :17])
    second = model(x[:, 17:], state=first.state)
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), whole.logits, atol=1e-5)
    for m1, m2 in zip(second.state.memory, whole.state.memory, strict=True):
        assert torch.allclose(m1, m2, atol=1e-5)


def test_memory_is_trimmed_to_memory_len_minus_segment():
    torch.manual_seed(0)
    model = ShatterLM(ShatterConfig.smoke(**{**TINY, "memory_len": 20})).eval()
    state = None
    for _ in range(3):
        out = model(torch.randint(0, 256, (2, 8)), state=state, return_attention=True)
        state = out.state
    # Before the third segment each memory (16 rows) is cut to 20 - 8 = 12: keys = 12 + 8.
    assert [w.shape for w in out.attention] == [(2, 8, 20)] * 2
    assert [m.shape for m in state.memory] == [(2, 20, 16)] * 2


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ShatterLM(ShatterConfig.smoke(**TINY, dropout_hidden=0.1))
    x = torch.randint(0, 256, (2, 8))
    state = model(x).state
    model(x, state=state, targets=x).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_presets_are_about_the_size_of_their_targets():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):  # shapes only: no memory, no time for the 50M-parameter models
        targets = {
            "cpu": count(SHAQ(SHARNNConfig.cpu())),
            "paper": count(SHARNN(SHARNNConfig.paper())),
        }
        counts = {
            name: count(ShatterLM(ShatterConfig.preset(name))) for name in ("smoke", "cpu", "paper")
        }
    report = f"ShatterLM parameters {counts}, targets {targets}"
    for name, target in targets.items():
        assert abs(counts[name] / target - 1) <= 0.10, report
    assert counts["smoke"] < counts["cpu"] / 5, report
    # With K = 3 and no output projection the attention has (K + 1) d^2 weights, multi-head's 4 d^2.
    attention = ShatterLM(ShatterConfig.smoke()).blocks[0].attention
    assert count(attention) == 4 * 64 * 64 + 64 + 1  # W_q, b_q, W_v^1..3 and c


def test_boom_option_sums_chunks():
    mlp = ShatterLM(ShatterConfig.smoke())
    boom = ShatterLM(ShatterConfig.smoke(ff="boom"))
    assert mlp.blocks[0].ff.down is not None and boom.blocks[0].ff.down is None


def test_softmax_ablation_normalises_the_weights():
    torch.manual_seed(0)
    model = ShatterLM(ShatterConfig.smoke(**TINY, softmax=True)).eval()
    out = model(torch.randint(0, 256, (2, 9)), return_attention=True)
    for w in out.attention:
        assert torch.allclose(w.sum(-1), torch.ones(2, 9))


def test_training_lowers_the_loss_on_a_repeated_text():
    torch.manual_seed(0)
    model = ShatterLM(ShatterConfig.smoke())
    text = torch.tensor(list(b"the cat sat on the mat. " * 11))  # 264 bytes
    x, y = text[:256].repeat(4, 1), text[1:257].repeat(4, 1)
    optimiser = shaq.optim.LAMB(model.parameters(), lr=3e-3)  # the library's; c is a 0-d tensor
    losses = []
    for _ in range(30):
        loss = model(x, targets=y).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 2.0, losses


def test_generate_works_with_shatter(model):
    out = shaq.generate(model, b"prompt", 20, seed=0)
    assert isinstance(out, bytes) and len(out) == 20
    assert shaq.generate(model, b"prompt", 20, seed=0) == out
    greedy = shaq.generate(model, b"prompt", 10, temperature=0)
    assert len(greedy) == 10 and shaq.generate(model, b"prompt", 10, temperature=0) == greedy


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vocab_size=100), "vocab_size must be 256"),
        (dict(d_model=0), "d_model must be >= 1"),
        (dict(n_partitions=0), "n_partitions must be >= 1"),
        (dict(memory_len=0), "memory_len must be >= 1"),
        (dict(ff="swiglu"), "ff must be 'mlp' or 'boom'"),
        (dict(dropout_hidden=1.0), r"dropout_hidden must be in \[0, 1\)"),
    ],
)
def test_nonsense_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        ShatterConfig(**overrides)


def test_presets_and_to_dict():
    config = ShatterConfig.preset("cpu", n_partitions=4)
    assert (config.d_model, config.n_partitions, config.dropout_hidden) == (256, 4, 0.0)
    assert ShatterConfig(**config.to_dict()) == config
    assert ShatterConfig.paper() == ShatterConfig()
    with pytest.raises(ValueError, match="unknown preset"):
        ShatterConfig.preset("huge")
    with pytest.raises(ValueError, match="ShatterConfig"):
        ShatterLM(SHARNNConfig.smoke())
    assert ShatterLM.name == "shatter" and ShatterLM.config_class is ShatterConfig


def test_invalid_inputs_and_states_raise_clear_errors(model):
    with pytest.raises(ValueError, match="0..255"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(6, dtype=torch.long))
    state = model(torch.zeros(2, 3, dtype=torch.long)).state
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(3, 3, dtype=torch.long), state=state)
    deeper = ShatterLM(ShatterConfig.smoke(**{**TINY, "n_layers": 3}))
    with pytest.raises(ValueError, match="another model"):
        deeper(torch.zeros(2, 3, dtype=torch.long), state=state)
    shaq_state = SHAQ(SHARNNConfig.smoke()).eval()(torch.zeros(2, 3, dtype=torch.long)).state
    with pytest.raises(ValueError, match="another model"):
        model(torch.zeros(2, 3, dtype=torch.long), state=shaq_state)
    with pytest.raises(ValueError, match="another model"):
        SHARNN(SHARNNConfig.smoke())(torch.zeros(2, 3, dtype=torch.long), state=state)
    with pytest.raises(ValueError, match="State"):
        model(torch.zeros(2, 3, dtype=torch.long), state={"memory": []})

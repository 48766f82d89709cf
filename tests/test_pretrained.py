"""The weights that ship with shaq: all of them there, intact, and scoring what they scored when
they were trained."""

import hashlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import shaq.pretrained
from shaq.__main__ import main
from shaq.data import load_standin
from shaq.evaluate import evaluate
from shaq.pretrained import RECIPES, PretrainedError
from shaq.provenance import stale

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = Path(shaq.pretrained.__file__).parent


def test_every_recipe_ships():
    assert shaq.pretrained.names() == list(RECIPES)


def test_the_weights_fit_the_budget_and_load_without_code():
    total = sum((SHIPPED / f"{name}.pt").stat().st_size for name in shaq.pretrained.names())
    assert total <= 40 * 2**20
    for name in shaq.pretrained.names():
        weights = torch.load(SHIPPED / f"{name}.pt", weights_only=True)
        dtype = shaq.pretrained.manifest(name)["weights"]["dtype"]
        assert {str(t.dtype) for t in weights.values()} == {f"torch.{dtype}"}


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_shipped_model_scores_what_its_manifest_says(name):
    manifest = shaq.pretrained.manifest(name)
    corpus = load_standin()
    if corpus.name != manifest["data"]["name"]:
        pytest.skip(
            f"{name} was measured on {manifest['data']['name']}; this Python builds "
            f"{corpus.name}, other bytes"
        )
    check = manifest["check"]
    data = corpus.valid[: check["bytes"]]
    if hashlib.sha256(data.numpy().tobytes()).hexdigest() != check["sha256"]:
        pytest.skip(f"this {corpus.name} differs from the one {name} was measured on")
    model = shaq.pretrained.load(name)
    assert not model.training
    seq_len = manifest["train_config"]["seq_len"]
    bpb = evaluate(model, data, check["batch_size"], seq_len)
    assert bpb == pytest.approx(check["bpb"], abs=1e-4)


def test_the_manifest_says_how_it_was_made():
    for name in shaq.pretrained.names():
        m = shaq.pretrained.manifest(name)
        assert m["command"].startswith("python -m shaq train --preset cpu --data standin ")
        assert shlex.join(RECIPES[name]) in m["command"]
        assert m["seconds"] >= 15 * 60 and m["steps"] > 0 and m["bytes"] > 0
        assert m["valid_curve"] and m["train_curve"]
        assert abs(m["valid_bpb"] - m["float32_valid_bpb"]) < 0.005
        assert stale(m["commit"], ROOT) is None, name


def test_a_damaged_file_is_refused(tmp_path, monkeypatch):
    name = shaq.pretrained.names()[0]
    for suffix in (".pt", ".json"):
        shutil.copy(SHIPPED / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    data = bytearray((tmp_path / f"{name}.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / f"{name}.pt").write_bytes(bytes(data))
    monkeypatch.setattr(shaq.pretrained, "_file", lambda n, suffix: tmp_path / f"{n}{suffix}")
    with pytest.raises(PretrainedError, match=f"{name}: {name}.pt is damaged .* reinstall shaq"):
        shaq.pretrained.load(name)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(PretrainedError, match="no shipped model is called 'gpt-5'; there are: "):
        shaq.pretrained.load("gpt-5")


def test_the_command_line_takes_pretrained_names(capsys):
    assert main(["eval", "pretrained:shaq-cpu-standin", "--split", "valid", "--bytes", "2048"]) == 0
    assert "valid bpb" in capsys.readouterr().out
    assert main(["generate", "pretrained:shaq-cpu-standin", "--prompt", "def ", "-n", "8"]) == 0
    with pytest.raises(SystemExit) as stop:
        main(["eval", "pretrained:nope"])
    assert stop.value.code == 2
    assert "no shipped model is called 'nope'" in capsys.readouterr().err


def test_stale_names_what_makes_a_revision_out_of_date():
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert "uncommitted" in stale(head + "+", ROOT)
    assert "no commit" in stale("0000000", ROOT)
    first = subprocess.run(
        ["git", "-C", str(ROOT), "rev-list", "--max-parents=0", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    assert "older than" in stale(first, ROOT)

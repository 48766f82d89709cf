"""shaq.notebook (the book's setup helper) and the conventions every chapter notebook follows."""

import json
import random
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import shaq
from shaq import notebook

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


@pytest.fixture
def clean_env(monkeypatch):
    """No SHAQ_* variable from the caller's shell leaks into a test."""
    for name in (notebook.LEVEL_ENV, notebook.DEVICE_ENV, notebook.THREADS_ENV, notebook.DATA_ENV):
        monkeypatch.delenv(name, raising=False)
    keep = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(keep)


# ----------------------------------------------------------------------------- run levels


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "demo"),
        ("", "demo"),
        ("   ", "demo"),
        ("smoke", "smoke"),
        (" Demo ", "demo"),
        ("FULL", "full"),
    ],
)
def test_parse_level(value, expected):
    """Unset means demo on every machine: full (hours of GPU time) is only ever asked for."""
    assert notebook.parse_level(value) == expected


@pytest.mark.parametrize("value", ["quick", "smoke1", "0", "tiny"])
def test_parse_level_rejects_unknown_names_and_lists_the_valid_ones(value):
    with pytest.raises(ValueError, match="smoke, demo, full"):
        notebook.parse_level(value)


def test_full_cost_is_said_in_gpu_hours_at_the_papers_speed():
    from shaq.train_config import TrainConfig

    # 32 epochs of enwik8 at 1,800 s an epoch: 16 GPU-hours.
    assert "16.0 GPU-hours" in notebook.full_cost(TrainConfig.paper())
    # 2,000 steps of 16 x 1024 bytes = 32,768,000 bytes at 50,000 bytes/s: 655 s.
    assert "11 GPU-minutes" in notebook.full_cost(TrainConfig.paper(steps=2000, epochs=None))
    # A time budget bounds the cost when it ends first.
    line = notebook.full_cost(TrainConfig.paper(minutes=60))
    assert "1.0 GPU-hours" in line and "60-minute budget" in line
    assert "20 GPU-minutes" in notebook.full_cost(train_bytes=60_000_000)
    with pytest.raises(ValueError, match="not both"):
        notebook.full_cost()


def test_rate_text_says_the_warmup_and_the_decay():
    from shaq.train_config import TrainConfig

    assert notebook.rate_text(TrainConfig.paper()) == "lamb lr 0.002, warmup 800"
    cpu = TrainConfig.cpu(optimizer="adam")
    assert notebook.rate_text(cpu) == "adam lr 0.004, warmup 100, linear decay to 0"


def test_setup_reads_the_level_and_device_from_the_environment(clean_env):
    clean_env.setenv(notebook.LEVEL_ENV, "smoke")
    clean_env.setenv(notebook.DEVICE_ENV, "cpu")
    level = notebook.setup(seed=1, quiet=True)
    assert (level.name, level.device) == ("smoke", torch.device("cpu"))
    assert level.is_smoke and not level.is_full
    assert (level.data, level.max_bytes) == ("standin", notebook.SMOKE_MAX_BYTES)


def test_setup_without_a_level_is_demo_on_the_cpu(clean_env):
    level = notebook.setup(device="cpu", quiet=True)
    assert level.name == "demo" and not level.is_smoke and not level.is_full
    assert (level.data, level.max_bytes) == ("standin", None)


def test_setup_arguments_beat_the_environment(clean_env):
    clean_env.setenv(notebook.LEVEL_ENV, "demo")
    assert notebook.setup(level="full", device="cpu", quiet=True).name == "full"


def test_setup_rejects_an_invalid_level(clean_env):
    clean_env.setenv(notebook.LEVEL_ENV, "fast")
    with pytest.raises(ValueError, match="SHAQ_RUN='fast' is not a run level"):
        notebook.setup(device="cpu", quiet=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_setup_rejects_a_device_the_machine_lacks(clean_env):
    clean_env.setenv(notebook.DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match="cuda"):
        notebook.setup(quiet=True)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_setup_rejects_a_bad_thread_count(clean_env, value):
    clean_env.setenv(notebook.THREADS_ENV, value)
    with pytest.raises(ValueError, match="SHAQ_THREADS"):
        notebook.setup(device="cpu", quiet=True)


def test_setup_honours_the_thread_count(clean_env):
    clean_env.setenv(notebook.THREADS_ENV, "1")
    notebook.setup(device="cpu", quiet=True)
    assert torch.get_num_threads() == 1


def test_pick_chooses_the_value_of_the_level():
    for name, expected in [("smoke", 1), ("demo", 2), ("full", 3)]:
        level = notebook.RunLevel(name=name, device="cpu")
        assert level.pick(smoke=1, demo=2, full=3) == expected


def test_pick_needs_all_three_values():
    with pytest.raises(TypeError):
        notebook.RunLevel(name="demo", device="cpu").pick(smoke=1, demo=2)


def test_run_level_rejects_unknown_names():
    with pytest.raises(ValueError, match="run level"):
        notebook.RunLevel(name="tiny", device="cpu")


def test_seeding_is_deterministic(clean_env):
    def draw():
        notebook.setup(seed=123, device="cpu", quiet=True)
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    first, second = draw(), draw()
    assert first == second
    notebook.setup(seed=124, device="cpu", quiet=True)
    assert torch.rand(3).tolist() != first[2]


def test_smoke_corpus_is_the_start_of_each_split_of_the_standin():
    level = notebook.RunLevel(name="smoke", device="cpu")
    corpus, whole = level.load_corpus(), shaq.data.load_standin()
    assert corpus.name == shaq.data.STANDIN_NAME
    sizes = [corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()]
    assert sizes == [900_000, 50_000, 50_000] and sum(sizes) == notebook.SMOKE_MAX_BYTES
    # so smoke scores the validation bytes the Trainer scores, as every other level does
    for split in ("train", "valid", "test"):
        part = getattr(corpus, split)
        assert torch.equal(part, getattr(whole, split)[: part.numel()]), split
    assert torch.equal(level.valid_slice(corpus), whole.valid[: level.eval_bytes])
    assert "the first 900,000 / 50,000 / 50,000 bytes of its train / valid / test splits" in (
        level.data_description
    )


def test_full_level_reads_enwik8_from_shaq_data(clean_env, tmp_path):
    clean_env.setenv(notebook.DATA_ENV, str(tmp_path))
    level = notebook.setup(level="full", device="cpu", quiet=True)
    assert level.data_root == tmp_path and level.data == "enwik8" and level.max_bytes is None
    assert level.data_description == "enwik8" and level.at("smoke").data == "standin"


def test_full_level_without_enwik8_stops_and_says_what_to_do(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    level = notebook.RunLevel(name="full", device="cpu", data_root=tmp_path)
    with pytest.raises(shaq.data.DataError, match="by hand"):  # never the stand-in instead
        level.load_corpus()


# ----------------------------------------------------------------------------- provenance


@pytest.mark.parametrize(
    "seconds, text",
    [(0.42, "0.4 s"), (9.94, "9.9 s"), (42.4, "42 s"), (133, "2 min 13 s"), (3900, "1 h 05 min")],
)
def test_format_duration(seconds, text):
    assert notebook.format_duration(seconds) == text


def test_provenance_line_names_level_data_device_time_and_version():
    level = notebook.RunLevel(name="demo", device="cpu")
    line = level.provenance(133)
    assert line.startswith(
        f"Produced by run level demo on {level.data_description}, CPU, in 2 min 13 s, shaq "
        f"{shaq.__version__}"
    )
    assert "stand-in" in line and "in 2 min" not in level.provenance()


def test_finish_prints_the_provenance_outside_ipython(capsys):
    level = notebook.RunLevel(name="smoke", device="cpu")
    level.finish()
    out = capsys.readouterr().out
    assert out.startswith("Produced by run level smoke") and ", in " in out


def test_timer_measures_and_prints(capsys):
    with notebook.Timer("counting") as timer:
        sum(range(1000))
    assert timer.seconds >= 0 and capsys.readouterr().out.startswith("counting: ")


# ----------------------------------------------------------------------------- tables


def test_table_is_markdown_in_jupyter_and_aligned_text_elsewhere():
    table = notebook.Table(
        ["model", "bytes", "bpb", "ok", "share"],
        [["unigram", 1234567, 4.93125, True, "7%"], ["a|b", 12, None, False, "93%"]],
    )
    assert table._repr_markdown_() == (
        "| model | bytes | bpb | ok | share |\n|---|---|---|---|---|\n"
        "| unigram | 1,234,567 | 4.931 | True | 7% |\n| a\\|b | 12 | n/a | False | 93% |"
    )
    # What reads as a number (n/a and 93% too) goes to the right, words and booleans to the left.
    assert repr(table).splitlines() == [
        "model        bytes    bpb  ok     share",
        "-------  ---------  -----  -----  -----",
        "unigram  1,234,567  4.931  True      7%",
        "a|b             12    n/a  False    93%",
    ]
    assert notebook.Table(["x"], [[0.5]], digits=1).text().splitlines()[-1] == "0.5"
    # Numbers a chapter formatted itself read as numbers too.
    assert notebook.Table(["error"], [["3.1e-07"], ["-2"]]).text().splitlines()[-1] == "     -2"
    with pytest.raises(ValueError, match="every row needs 2 values"):
        notebook.Table(["a", "b"], [[1, 2], [3]])


@pytest.mark.parametrize(
    "value, text",
    [
        (12345.6, "12,346"),
        (123.4, "123"),
        (1.2345, "1.23"),
        (0.012345, "0.0123"),
        (-2.5, "-2.50"),
        (7, "7"),
        (None, "n/a"),
    ],
)
def test_table_without_digits_rounds_floats_by_their_size(value, text):
    from shaq.table import format_value

    assert format_value(value, digits=None) == text


# ----------------------------------------------------------------------------- live plot


def test_live_plot_outside_ipython_draws_once_at_close():
    plot = notebook.LivePlot()
    plot.hline(8.0, "uniform guess")
    for step in range(5):
        plot.add("train", step, 8 - step)
    plot.add("valid", 4, 5.0)
    figure = plot.close()
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["uniform guess", "train", "valid"]
    assert list(figure.axes[0].get_lines()[1].get_ydata()) == [8, 7, 6, 5, 4]
    assert plot.png().startswith(b"\x89PNG")
    with pytest.raises(RuntimeError, match="closed"):
        plot.add("train", 6, 1.0)


# ----------------------------------------------------------------------------- book conventions


def _notebooks():
    return sorted(path for path in BOOK.glob("*.ipynb"))


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _repository_url() -> str:
    """repository.url from _config.yml, read without a YAML parser (one 'url:' line)."""
    text = (ROOT / "_config.yml").read_text()
    match = re.search(r"^repository:\s*\n(?:\s+.*\n)*?\s+url\s*:\s*(\S+)", text, re.MULTILINE)
    assert match, "_config.yml has no repository.url"
    return match.group(1)


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_chapter_notebook_follows_the_book_conventions(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3", (
        "nbmake and Colab need the python3 kernel"
    )
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    first = _source(code[0])
    assert "shaq.notebook.setup(" in first, "the first code cell must call shaq.notebook.setup"
    # Colab installs shaq from the repository named once, in _config.yml; nothing else installs.
    installs = re.findall(r"%pip install[^\n]*", first)
    assert installs == [f"%pip install -q git+{_repository_url()}"], installs
    assert '"google.colab" in sys.modules' in first
    assert "level.finish()" in _source(code[-1]), "the last code cell must call level.finish()"
    for cell in code:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"stored error output in {path.name}"
            text = json.dumps(output)
            assert "/work/" not in text and "/root/" not in text and "/home/" not in text, (
                f"an absolute local path is stored in an output of {path.name}"
            )


# ----------------------------------------------------------------------------- site checks


def _tools():
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return importlib.import_module("check_site"), importlib.import_module("screenshot_check")
    finally:
        sys.path.remove(str(ROOT / "tools"))


GOOD_PAGE = """<html><body><h1>Chapter</h1>
<div class="cell_output docutils container"><div class="output stream highlight-myst-ansi">
<pre>Produced by run level demo on the stand-in, CPU, in 3.7 s, shaq 0.1.0</pre></div>
<img alt="_images/fig.png" src="../_images/fig.png" /></div>
</body></html>"""


def _fake_site(tmp_path, page=GOOD_PAGE):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/ch\n")
    (tmp_path / "book").mkdir()
    cell = {
        "cell_type": "code",
        "metadata": {},
        "source": "plot()",
        "execution_count": 1,
        "outputs": [
            {
                "output_type": "display_data",
                "metadata": {},
                "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"},
            }
        ],
    }
    notebook = {"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "book" / "ch.ipynb").write_text(json.dumps(notebook))
    html = tmp_path / "_build" / "html"
    (html / "book").mkdir(parents=True)
    (html / "_images").mkdir()
    (html / "_images" / "fig.png").write_bytes(b"\x89PNG")
    (html / "book" / "ch.html").write_text(page)
    return ["--root", str(tmp_path)]


def test_check_site_passes_a_good_page(tmp_path, capsys):
    check_site, _ = _tools()
    assert check_site.main(_fake_site(tmp_path) + ["--expect-level", "demo"]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_site_can_list_stale_chapters_as_warnings(tmp_path, capsys):
    check_site, _ = _tools()
    page = GOOD_PAGE.replace("shaq 0.1.0</pre>", "shaq 0.1.0 (abc1234+)</pre>")
    assert check_site.main(_fake_site(tmp_path, page) + ["--stale-chapters", "warn"]) == 0
    assert "warning: book/ch.html: outputs are not current" in capsys.readouterr().out


def test_check_site_finds_shipped_weights_that_are_not_current(tmp_path, capsys):
    check_site, _ = _tools()
    args = _fake_site(tmp_path)
    (tmp_path / "shaq" / "pretrained").mkdir(parents=True)
    (tmp_path / "shaq" / "pretrained" / "m.json").write_text('{"commit": "abc1234+"}')
    assert check_site.main(args) == 1
    assert (
        "m.json: the weights are not current: abc1234+ had uncommitted" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (('src="../_images/fig.png"', 'src="../_images/gone.png"'), "does not exist"),
        (
            (
                "<pre>Produced",
                '<div class="output traceback">Traceback (most recent call last)</div>'
                "<pre>Produced",
            ),
            "traceback",
        ),
        (("<pre>Produced", "<pre>ValueError: bad\nProduced"), "ValueError"),
        (
            (
                "</body>",
                '<script type="application/vnd.jupyter.widget-view+json">'
                '{"model_id": "m1"}</script></body>',
            ),
            "no saved state",
        ),
        (
            ("<pre>Produced", "<pre>HBox(children=(FloatProgress(value=0.0),))\nProduced"),
            "widget as text",
        ),
        (("<pre>Produced", "<pre>saved to /work/main/runs\nProduced"), "local path"),
        (
            ("in 3.7 s", "(still running: the time appears when the notebook finishes)"),
            "never completed",
        ),
        (("run level demo", "run level smoke"), "expected demo"),
        (
            ("shaq 0.1.0</pre>", "shaq 0.1.0 (abc1234+)</pre>"),
            "not current: abc1234+ had uncommitted",
        ),
        (("shaq 0.1.0</pre>", "shaq 0.1.0 (abc1234)</pre>"), "abc1234 is no commit"),
    ],
)
def test_check_site_finds_what_readers_would_see_broken(tmp_path, capsys, change, message):
    check_site, _ = _tools()
    args = _fake_site(tmp_path, GOOD_PAGE.replace(*change))
    assert check_site.main(args + ["--expect-level", "demo"]) == 1
    assert message in capsys.readouterr().out


def test_check_site_needs_a_page_per_toc_entry(tmp_path, capsys):
    check_site, _ = _tools()
    args = _fake_site(tmp_path)
    (tmp_path / "_build" / "html" / "book" / "ch.html").unlink()
    assert check_site.main(args) == 1 and "no page" in capsys.readouterr().out


def test_screenshot_check_refuses_a_diagram_that_is_missing_broken_or_blank(tmp_path):
    _, screenshot_check = _tools()
    browser = screenshot_check.find_browser()
    if browser is None:
        pytest.skip("no Chromium on this machine (CI installs it before the site checks)")
    drawn = ROOT / "book" / "figures" / "lstm_cell.svg"
    broken = tmp_path / "broken.svg"
    broken.write_text("<svg xmlns='http://www.w3.org/2000/svg'><rect width=", encoding="utf-8")
    blank = tmp_path / "blank.svg"
    blank.write_text(
        "<svg xmlns='http://www.w3.org/2000/svg' width='400' height='300'></svg>", encoding="utf-8"
    )
    stem = tmp_path / "page"
    seen, problem = screenshot_check.check_diagram(browser, drawn, stem)
    assert problem is None and seen.startswith("lstm_cell.svg ("), seen
    cases = {tmp_path / "gone.svg": "not in the built site", broken: "does not decode"}
    cases[blank] = "renders blank"
    for svg, expected in cases.items():
        seen, problem = screenshot_check.check_diagram(browser, svg, stem)
        assert seen is None and expected in problem, (svg.name, problem)


def test_screenshot_png_reader_matches_pillow(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image

    _, screenshot_check = _tools()
    figure = Figure(figsize=(2, 1), dpi=50)
    figure.add_subplot().plot([0, 1], [1, 0])
    path = tmp_path / "plot.png"
    figure.savefig(path)
    width, height, channels, pixels = screenshot_check.read_png(path)
    with Image.open(path) as image:
        assert (width, height) == image.size
        assert pixels == image.convert({3: "RGB", 4: "RGBA"}[channels]).tobytes()
    overall, column = screenshot_check.ink_fractions(path)
    assert 0 < overall < 1 and 0 < column < 1

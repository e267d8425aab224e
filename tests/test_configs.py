"""Every YAML in ``configs/`` runs ``rnorm fit`` end to end; the CLI's errors name what is wrong.

Each config is run through :func:`rnorm.cli.main` as ``rnorm fit --config X`` with
``fast_dev_run`` (one training, validation and test batch), a hidden size of 8 and data written in
``tmp_path``: the MNIST sample shipped with rnorm, a generated corpus in the character-level PTB
format, a miniature text8. The model, task, optimizer, schedule, strategies and callbacks are the
config's own, and so is the MNIST mode (784 pixel steps where the config says ``pixel``).
Configs are found by a glob, so a new one is covered without editing this file.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import string
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rnorm import cli as cli_module
from rnorm import lightning_cli, norms
from rnorm.callbacks import PopulationStatistics
from rnorm.data import text as text_module
from rnorm.data import write_idx, write_synthetic_corpus
from rnorm.data.mnist import MNIST_FILES
from rnorm.norms import BatchStatisticsNorm

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted([*CONFIG_DIR.rglob("*.yaml"), *CONFIG_DIR.rglob("*.yml")])
CONFIG_IDS = [str(path.relative_to(CONFIG_DIR)) for path in CONFIGS]
#: Configs that reproduce no paper result, so their header names no table or section.
NOT_REPRODUCTIONS = {"quickstart.yaml"}
#: The papers a header may cite: Cooijmans et al. (BN) and Laurent et al. (NP).
PAPERS = ("Recurrent Batch Normalization", "Recurrent Normalization Propagation")

SEQ_LENGTH = 10
EVAL_LENGTHS = [20, 30]  # longer than training, as in BN Fig. 3b
FAST = [
    "--trainer.fast_dev_run=true",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.encoder.init_args.hidden_size=8",
    "--population_statistics.num_batches=2",
]


@pytest.fixture(autouse=True)
def _console(monkeypatch, tmp_path, one_thread):
    """The CLI as a console script sees it, in ``tmp_path``, on one intra-op thread (``one_thread``:
    the 784-step pixel loop of the MNIST configs took 5 to 30 s instead of 1 s on two busy cores).

    ``sys.argv`` holds only the program name: LightningCLI warns when it holds arguments besides
    ``args`` (here it would hold pytest's).
    """
    monkeypatch.setattr(sys, "argv", ["rnorm"])
    monkeypatch.chdir(tmp_path)


class RecordingCLI(lightning_cli.RnormCLI):
    """``RnormCLI`` that keeps itself and the metrics logged by ``fit`` (``after_fit`` then tests)."""

    last: RecordingCLI | None = None

    def __init__(self, *args, **kwargs) -> None:
        RecordingCLI.last = self
        self.fit_metrics: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def after_fit(self) -> None:
        self.fit_metrics = {name: float(value) for name, value in self.trainer.callback_metrics.items()}
        super().after_fit()


def _run(monkeypatch, args: list[str]) -> RecordingCLI:
    """``rnorm.cli.main(args)`` with the CLI object kept; fails if main does not return 0."""
    monkeypatch.setattr(lightning_cli, "RnormCLI", RecordingCLI)
    RecordingCLI.last = None
    assert cli_module.main(args) == 0
    assert RecordingCLI.last is not None
    return RecordingCLI.last


# -- data written in tmp_path --------------------------------------------------------------------
WORDS = ["the", "of", "and", "to", "a", "in", "stock", "market", "<unk>", "N", "$", "bank", "'s", "co."]


def _sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(count)]


def _ptb_format(sentences: list[str]) -> str:
    """Mikolov's character format (see ``parse_ptb_chars``): every symbol, the end-of-sentence
    newline included, followed by one space; ``_`` between words."""
    symbols = "".join(sentence.replace(" ", "_") + "\n" for sentence in sentences)
    return "".join(symbol + " " for symbol in symbols)


def _write_ptb(folder: Path) -> Path:
    folder.mkdir(parents=True)
    counts = {"train": 120, "valid": 15, "test": 15}
    for seed, (split, count) in enumerate(counts.items()):
        (folder / f"ptb.char.{split}.txt").write_text(_ptb_format(_sentences(seed, count)))
    # The format as parse_ptb_chars reads it: spaces dropped, newlines kept.
    assert text_module.parse_ptb_chars((folder / "ptb.char.valid.txt").read_text()).count("\n") == 15
    return folder


def _write_text8(folder: Path, monkeypatch) -> Path:
    sizes = (2_000, 200, 200)
    monkeypatch.setattr(text_module, "TEXT8_SIZES", sizes)
    rng = random.Random(0)
    text = string.ascii_lowercase + " "  # every symbol in the training split
    while len(text) < sum(sizes):
        text += "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 9))) + " "
    folder.mkdir(parents=True)
    (folder / "text8").write_text(text[: sum(sizes)])
    return folder


def _data_args(config: dict, tmp_path: Path, monkeypatch) -> list[str]:
    """Overrides that point the config's data module at small data in ``tmp_path``."""
    data = config["data"]
    init = data.get("init_args", {})
    if data["class_path"].endswith("SequentialMNISTDataModule"):
        # The sample shipped with rnorm, in the config's own mode (pixel: 784 steps, about 1 s here).
        return ["--data.init_args.data_dir=null", "--data.init_args.batch_size=4", "--data.init_args.val_size=8"]
    if data["class_path"].endswith("CharLMDataModule"):
        corpus = init.get("corpus", "ptb")
        if corpus == "ptb":
            folder = _write_ptb(tmp_path / "ptb")
        elif corpus == "text8":
            folder = _write_text8(tmp_path / "text8", monkeypatch)
        else:
            pytest.fail(f"No small data for corpus {corpus!r}: add it to _data_args")
        args = [
            f"--data.init_args.data_dir={folder}",
            f"--data.init_args.seq_length={SEQ_LENGTH}",
            "--data.init_args.batch_size=4",
        ]
        if init.get("eval_lengths"):
            args.append(f"--data.init_args.eval_lengths={EVAL_LENGTHS}")
        return args
    if data["class_path"].endswith("QADataModule"):
        # A generated corpus in the DeepMind .question format (the real one cannot be downloaded here).
        folder = tmp_path / "cnn"
        write_synthetic_corpus(folder, num_train=40, num_valid=8, num_test=8, seed=0)
        return [f"--data.init_args.data_dir={folder}", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4"]
    if data["class_path"].endswith("BinarizedMNISTDataModule"):
        # The MNIST sample shipped with rnorm, binarized at 0.5, instead of the fixed .amat files.
        return [
            "--data.init_args.source=mnist",
            "--data.init_args.data_dir=null",
            "--data.init_args.batch_size=4",
            "--data.init_args.val_size=8",
            "--model.init_args.glimpses=3",
        ]
    pytest.fail(f"No small data for {data['class_path']}: add it to _data_args")


def _monitored(config: dict) -> str | None:
    """The metric the config's ModelCheckpoint selects on (``val/acc`` …), if it has one."""
    for callback in config.get("trainer", {}).get("callbacks") or []:
        if callback["class_path"].endswith("ModelCheckpoint"):
            return callback.get("init_args", {}).get("monitor")
    return None


# -- every config --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_fits_and_tests_under_fast_dev_run(path, tmp_path, monkeypatch):
    config = yaml.safe_load(path.read_text())
    cwd = tmp_path / "cwd"  # relative paths (runs/, lightning_logs/, data/) would land here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # Needed: ModelCheckpoint(save_last=True) writes root/checkpoints/last.ckpt even under fast_dev_run
    # (in the config's runs/… otherwise). The config file and logs are skipped under fast_dev_run.
    root = tmp_path / "root"
    args = ["fit", "--config", str(path), *FAST, f"--trainer.default_root_dir={root}"]
    cli = _run(monkeypatch, args + _data_args(config, tmp_path, monkeypatch))

    trainer = cli.trainer
    assert trainer.state.finished
    monitored = _monitored(config)
    if monitored is not None:
        assert monitored in cli.fit_metrics, f"{path.name} monitors {monitored}; fit logged {sorted(cli.fit_metrics)}"
        assert math.isfinite(cli.fit_metrics[monitored])

    # test_after_fit: fast_dev_run writes no best checkpoint, so the final model is tested.
    assert config.get("test_after_fit"), f"{path.name} does not test after fitting"
    assert trainer.state.fn == "test"
    assert trainer.checkpoint_callback is None or trainer.checkpoint_callback.best_model_path == ""
    test_metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    expected = ["test/" + monitored.split("/", 1)[1]] if monitored else []
    if config["data"].get("init_args", {}).get("eval_lengths"):
        expected += [f"test/bpc_length_{length}" for length in EVAL_LENGTHS]
    for name in expected:
        assert name in test_metrics, f"{name} not logged by the test; got {sorted(test_metrics)}"
        assert math.isfinite(test_metrics[name])
    assert any(name.startswith("test/") for name in test_metrics)

    # The overrides reached the objects the config builds.
    assert cli.model.encoder.hidden_size == 8
    population = [c for c in trainer.callbacks if isinstance(c, PopulationStatistics)]
    assert len(population) == 1 and population[0].num_batches == 2
    # Before the validation, an exact estimate averaged the 2 batches at every training step.
    # Fixed-length data: every step; variable-length (QA) or stepwise models (DRAW): the first step,
    # which every batch has.
    steps = getattr(cli.datamodule, "sequence_length", None) or getattr(cli.datamodule, "seq_length", None) or 1
    batch_norms = [m for m in cli.model.modules() if isinstance(m, BatchStatisticsNorm)]
    model_args = config["model"]["init_args"]
    sites = [model_args.get("attention_norm", "none")]
    for factory in ("encoder", "decoder"):
        if factory in model_args:
            init = model_args[factory].get("init_args", {})
            sites += [init.get(f"{site}_norm", "bn") for site in ("input", "recurrent", "cell")]  # the default: bn
    assert bool(batch_norms) == any(name in ("bn", "seqbn") for name in sites)
    for norm in batch_norms if population[0].mode == "exact" else []:
        assert norm.num_batches_tracked[:steps].tolist() == [2] * steps, norm
    if config["data"]["class_path"].endswith("SequentialMNISTDataModule"):
        init = config["data"].get("init_args", {})
        assert cli.datamodule.mode == init.get("mode", "pixel")  # the config's own mode, not a faster one
        assert cli.datamodule.permute == init.get("permute", False)
    # Nothing was written in the working directory (the configs' relative runs/ folders): with
    # default_root_dir and no logger, everything Lightning writes goes under tmp_path / "root".
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_header_names_its_source_and_its_own_path(path):
    header = list(itertools.takewhile(lambda line: line.startswith("#"), path.read_text().splitlines()))
    assert header, f"{path.name} has no header comment"
    usage = f"rnorm fit --config {path.relative_to(CONFIG_DIR.parent).as_posix()}"
    assert any(usage in line for line in header), f"{path.name}: the header should show `{usage}`"
    if path.name in NOT_REPRODUCTIONS and path.parent == CONFIG_DIR:
        return
    cites = [line for line in header if ("Table" in line or "§" in line) and any(paper in line for paper in PAPERS)]
    assert cites, f"{path.name}: the header should name the paper and the table or section it reproduces"


def test_configs_are_found_and_the_exemptions_exist():
    assert len(CONFIGS) >= 14
    assert NOT_REPRODUCTIONS <= {path.name for path in CONFIG_DIR.glob("*.y*ml")}


# -- --print_config ------------------------------------------------------------------------------
def test_print_config_round_trips(tmp_path, monkeypatch, capsys):
    path = CONFIG_DIR / "normprop_ptb" / "normprop.yaml"
    data_args = _data_args(yaml.safe_load(path.read_text()), tmp_path, monkeypatch)
    root = f"--trainer.default_root_dir={tmp_path / 'root'}"

    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["fit", "--config", str(path), root, *data_args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "rnorm.tasks.CharLanguageModel"
    assert config["model"]["init_args"]["encoder"]["init_args"]["recurrent_norm"] == "normprop"
    assert config["data"]["init_args"]["seq_length"] == SEQ_LENGTH
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)

    # Printing the printed config again gives the same config,
    with pytest.raises(SystemExit):
        cli_module.main(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config
    # and it runs.
    cli = _run(monkeypatch, ["fit", "--config", str(saved), *FAST])
    assert cli.trainer.state.finished and "test/bpc" in cli.trainer.callback_metrics
    assert cli.model.hparams.input_encoding == "orthogonal"
    assert type(cli.model.lr_schedulers()).__name__ == "ExponentialLR"


# -- clear errors --------------------------------------------------------------------------------
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
PTB = CONFIG_DIR / "ptb" / "lstm.yaml"


def _quickstart(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(QUICKSTART), *FAST, f"--trainer.default_root_dir={tmp_path / 'root'}", *extra]


def _error(capsys, args: list[str]) -> str:
    """The one message ``rnorm`` prints for ``args`` (exit status 1, no traceback), without its prefix."""
    assert cli_module.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--debug" in err.splitlines()[-1]
    line = next(line for line in err.splitlines() if line.startswith("rnorm: error: "))
    return line.removeprefix("rnorm: error: ")


def test_missing_mnist_folder_names_the_folder_and_the_four_files(tmp_path, capsys):
    folder = tmp_path / "no_mnist_here"
    message = _error(capsys, _quickstart(tmp_path, f"--data.init_args.data_dir={folder}"))
    assert str(folder) in message
    for name in MNIST_FILES:
        assert name in message
    assert "download" in message


def test_corrupt_idx_header_names_the_file_and_the_magic(tmp_path, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_FILES:
        shape = (4, 28, 28) if "images" in name else (4,)
        write_idx(folder / name, torch.zeros(shape, dtype=torch.uint8), compress=False)
    bad = folder / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + bad.read_bytes()[4:])  # type 0x0d (float) instead of 0x08
    message = _error(capsys, _quickstart(tmp_path, f"--data.init_args.data_dir={folder}", "--data.init_args.val_size=1"))
    assert "corrupt IDX header" in message and str(bad) in message
    assert "0x00000803" in message and "0x00000d03" in message


def test_empty_text_file_is_named(tmp_path, capsys):
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "train.txt").write_text("")
    for split in ("val", "test"):
        (folder / f"{split}.txt").write_text("some text\n" * 5)
    args = [
        "fit", "--config", str(PTB), *FAST, f"--trainer.default_root_dir={tmp_path / 'root'}",
        "--data.init_args.corpus=text",
        f"--data.init_args.data_dir={folder}",
        "--data.init_args.train_files=[train.txt]",
        "--data.init_args.val_files=[val.txt]",
        "--data.init_args.test_files=[test.txt]",
        "--data.init_args.eval_lengths=null",
        f"--data.init_args.seq_length={SEQ_LENGTH}",
    ]  # fmt: skip
    assert _error(capsys, args).startswith(f"The text file {folder / 'train.txt'} is empty")


def test_unknown_normalizer_is_caught_when_the_config_is_parsed(tmp_path, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(lightning_cli.RnormCLI, "instantiate_classes", lambda self: built.append(self))
    message = _error(capsys, _quickstart(tmp_path, "--model.init_args.encoder.init_args.recurrent_norm=nosuch"))
    assert built == []  # nothing was built: not the model, not the trainer
    listed = re.fullmatch(
        r"model\.init_args\.encoder\.init_args\.recurrent_norm: 'nosuch' is not a registered normalizer\. "
        r"Available names: (.*)\.",
        message,
    )
    assert listed, message
    assert listed.group(1).split(", ") == sorted(norms.available())
    assert not (tmp_path / "root").exists()


def test_unknown_class_path_is_a_parser_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(monkeypatch, _quickstart(tmp_path, "--model.class_path=rnorm.tasks.NoSuchTask"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "'rnorm.tasks.NoSuchTask'" in err


def test_normalizer_on_an_unsupported_site_says_where_it_may_go(tmp_path, capsys):
    message = _error(capsys, _quickstart(tmp_path, "--model.init_args.encoder.init_args.cell_norm=wn"))
    assert "WeightNorm cannot normalize the 'cell' site" in message
    assert "['input', 'recurrent']" in message and "'none'" in message

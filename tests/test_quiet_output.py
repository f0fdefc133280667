"""slurmtune.logs: other libraries' records and warnings go to debug.log by where they come from;
ours pass; --verbose shows everything and reaches the processes a command starts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
import warnings

import pytest

from slurmtune.cli.main import build_parser, main
from slurmtune.logs import VERBOSE_ENV, quiet_output


@pytest.fixture(autouse=True)
def not_verbose(monkeypatch, tmp_path):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.setenv("SLURMTUNE_DEBUG_LOG", str(tmp_path / "cli-debug.log"))  # not the home folder's


def _module(name: str, source: str) -> types.ModuleType:
    """A module named ``name`` (a library's, or one of ours) whose functions warn and log."""
    module = types.ModuleType(name)
    exec(compile(source, f"/site-packages/{name.replace('.', '/')}.py", "exec"), module.__dict__)
    return module


LIBRARY = """
import logging, sys, warnings
def configure():  # as transformers and DeepSpeed do when first imported: their own console handler
    log = logging.getLogger(__name__.split('.')[0])
    log.addHandler(logging.StreamHandler(sys.stderr))
    log.propagate = False
def speak():
    logging.getLogger(__name__).warning("library warning record")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    warnings.warn("library deprecation", FutureWarning, stacklevel=2)  # names the caller's file
def fail():
    logging.getLogger(__name__).error("library error record")
"""


def _debug_lines(run_dir) -> list[str]:
    return [line for line in (run_dir / "debug.log").read_text().splitlines() if "--- starts" not in line]


def test_library_output_goes_to_the_debug_log_by_origin(tmp_path, capsys, caplog, monkeypatch):
    shown = []  # where our own warnings go: Python's usual place (pytest's, under pytest)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest: shown.append(str(message)))
    lib = _module("fakelib.modeling", LIBRARY)
    ours = _module("slurmtune.fake_step", "import logging, warnings\n"
                   "def speak():\n    warnings.warn('our own warning', UserWarning)\n"
                   "    logging.getLogger(__name__).warning('our own record')\n")
    with quiet_output(tmp_path, "train"):
        lib.configure()  # after the job started, as a library imported inside the job does
        lib.speak()
        lib.fail()
        ours.speak()
        print("step 1/8  loss 7.6")
    out, err = capsys.readouterr()
    assert out == "step 1/8  loss 7.6\n"
    assert "library warning record" not in err and "gemm_4bit" not in err and "library deprecation" not in err
    assert "ERROR fakelib.modeling: library error record" in err  # errors may say why a job failed
    assert shown == ["our own warning"] and [r.getMessage() for r in caplog.records] == ["our own record"]
    lines = _debug_lines(tmp_path)
    assert [line.split(" ", 3)[3] for line in lines] == [
        "WARNING fakelib.modeling: library warning record",
        "WARNING bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward",
        f"FutureWarning fakelib.modeling ({os.path.basename(__file__)}:{_line_of('lib.speak()')}): "
        "library deprecation",
        "ERROR fakelib.modeling: library error record",
    ]
    assert all(line.split(" ")[2] == f"train[{os.getpid()}]" for line in lines)


def _line_of(text: str) -> int:
    source = open(__file__).read().splitlines()
    return next(i for i, line in enumerate(source, 1) if line.strip() == text)


def test_everything_is_as_before_outside(tmp_path, capsys):
    handlers, showwarning = logging.Logger.callHandlers, warnings.showwarning
    environ = dict(os.environ)
    with quiet_output(tmp_path, "eval.0"):
        assert os.environ["SUBMITIT_LOG_LEVEL"] == "WARNING"  # submitit's start/end lines, in the jobs
        assert logging.Logger.callHandlers is not handlers
    assert logging.Logger.callHandlers is handlers and warnings.showwarning is showwarning
    assert dict(os.environ) == environ
    logging.getLogger("fakelib.after").warning("seen again")
    assert "seen again" in capsys.readouterr().err


def test_verbose_shows_it_and_reaches_the_jobs_a_command_starts(tmp_path, capfd):
    child = ("import logging, warnings, os\n"
             "from slurmtune.logs import quiet_output\n"
             "with quiet_output(os.environ['RUN_DIR'], 'report'):\n"
             "    logging.getLogger('transformers.x').warning('child record')\n"
             "    print('child sees', os.environ.get('SLURMTUNE_VERBOSE'))\n")
    with quiet_output(verbose=True):
        logging.getLogger("datasets.x").warning("parent record")
        subprocess.run([sys.executable, "-c", child], env={**os.environ, "RUN_DIR": str(tmp_path)}, check=True)
    out, err = capfd.readouterr()
    assert "child sees 1" in out
    assert "WARNING datasets.x: parent record" in err and "WARNING transformers.x: child record" in err
    assert _debug_lines(tmp_path)[0].endswith("WARNING transformers.x: child record")


def test_processes_share_the_debug_log_line_by_line(tmp_path):
    """The jobs of a run (and the ranks of a DeepSpeed step) append to one file at once."""
    writer = ("import logging, os, sys\n"
              "from slurmtune.logs import quiet_output\n"
              "with quiet_output(sys.argv[1], 'rank' + sys.argv[2]):\n"
              "    for i in range(200):\n"
              "        logging.getLogger('deepspeed').warning('%s %d ' + 'x' * 300, sys.argv[2], i)\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path), str(rank)]) for rank in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    lines = _debug_lines(tmp_path)
    assert len(lines) == 800 and all(line.endswith(" " + "x" * 300) for line in lines)
    for rank in range(4):
        assert [int(line.split()[6]) for line in lines if f" rank{rank}[" in line] == list(range(200))


def test_hugging_face_bars_stay_out_of_batch_logs(tmp_path, capsys):
    from transformers.utils import logging as hf_logging
    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # (off for good where the hub was first imported in a quiet scope)
    with quiet_output(tmp_path, "eval.0", verbose=True):  # verbose, but stderr is no terminal
        assert not hf_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for the libraries imported later
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    if not before:
        hf_logging.disable_progress_bar()


def test_verbose_is_a_global_flag_and_a_command_flag(cli, tmp_path):
    parser = build_parser([])
    assert parser.parse_args(["--verbose", "status"]).verbose
    assert parser.parse_args(["status", "-v"]).verbose
    assert not parser.parse_args(["status"]).verbose
    from conftest import REPO
    r = cli("--verbose", "config", REPO / "manifests" / "quickstart.yaml", "train.lr=0.0002")
    assert r.code == 0 and "lr: 0.0002" in r.out


def test_cli_keeps_its_debug_log_outside_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURMTUNE_DEBUG_LOG")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr("slurmtune.cli.main.run_command", lambda args: logging.getLogger("peft").warning("hi"))
    main(["status"])
    assert "hi" not in capsys.readouterr().err
    assert (tmp_path / "slurmtune" / "debug.log").read_text().endswith(" WARNING peft: hi\n")


def test_what_deepspeed_prints_goes_to_the_debug_log(tmp_path, capsys):
    deepspeed = _module("deepspeed.comm.torch", "def build():\n    print('DeepSpeed shm_comm_op built successfully')\n")
    with quiet_output(tmp_path, "train.rank1"):
        deepspeed.build()
        print("2026-12-02 14:42:30 step 1/2  loss 7.598914")
    assert capsys.readouterr().out == "2026-12-02 14:42:30 step 1/2  loss 7.598914\n"
    assert _debug_lines(tmp_path)[0].endswith(" print deepspeed.comm.torch: DeepSpeed shm_comm_op built successfully")

"""Helpers for the sampling-script tests: tiny random checkpoints and script runners."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch as th

from mpi_launcher import require_mpiexec

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A 32x32 model with attention at 16 and 8 (output depths 0-3), and a matching classifier.
TINY_MODEL_FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 "
                    "--attention_resolutions 16,8 --num_heads 4 --class_cond True --learn_sigma True "
                    "--resblock_updown True --noise_schedule cosine").split()
TINY_CLASSIFIER_FLAGS = ("--classifier_width 32 --classifier_depth 1 "
                         "--classifier_attention_resolutions 16,8").split()
TINY_SAMPLE_FLAGS = "--timestep_respacing 3 --num_samples 5 --batch_size 2 --seed 7".split()


def parse(kind, flags):
    from guided_diffusion.sampling import create_argparser

    return create_argparser(kind).parse_args(list(flags))


def randomize_(module, seed=0):
    """Random weights everywhere (ADM zero-initialises its output layers)."""
    gen = th.Generator().manual_seed(seed)
    with th.no_grad():
        for p in module.parameters():
            noise = th.randn(p.shape, generator=gen)
            p.copy_(noise / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1 * noise)
    return module


def save_model(path, flags, randomize=True):
    """Build the diffusion UNet described by ``flags`` (argv list) and save its state dict."""
    from guided_diffusion import script_util as su

    args = parse("classifier", flags)
    model, _ = su.create_model_and_diffusion(**su.args_to_dict(args, su.model_and_diffusion_defaults()))
    if randomize:
        randomize_(model)
    th.save(model.state_dict(), path)
    return path


def save_classifier(path, flags, randomize=True):
    from guided_diffusion import script_util as su

    args = parse("classifier", flags)
    classifier = su.create_classifier(**su.args_to_dict(args, su.classifier_defaults()))
    if randomize:
        randomize_(classifier, seed=1)
    th.save(classifier.state_dict(), path)
    return path


def script_cmd(kind, flags, nproc=1):
    cmd = [PYTHON, str(REPO / "scripts" / f"{kind}_sample.py"), *map(str, flags)]
    return ([require_mpiexec(), "-n", str(nproc)] + cmd) if nproc > 1 else cmd


def script_env():
    """The scripts' environment: one thread each, and presets (configs/*.sh, which read PYTHON)
    run under the interpreter that runs the tests, not whatever `python` the PATH holds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHON=PYTHON)
    env.pop("OPENAI_LOGDIR", None)
    return env


def run_script(kind, flags, nproc=1, timeout=300, cwd=None):
    """Run a sampling script to completion; returns the CompletedProcess (text output)."""
    return subprocess.run(script_cmd(kind, flags, nproc), env=script_env(), cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def start_script(kind, flags, nproc=1, cwd=None):
    """Start a sampling script in its own process group (so a test can SIGKILL all of it)."""
    return subprocess.Popen(script_cmd(kind, flags, nproc), env=script_env(), cwd=cwd or REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def snapshot(directory):
    """{relative path: bytes} of every file under ``directory``."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def finished_shards(out_dir):
    """Names of the finished shards in a run directory (not the temp files of shards being
    written, ``batch_000002.tmp<pid>.npz``, which a killed run leaves behind)."""
    return sorted(p.name for p in (Path(out_dir) / "shards").glob("batch_[0-9][0-9][0-9][0-9][0-9][0-9].npz"))


def kill_after_shards(proc, out_dir, count=2, timeout=120):
    """SIGKILL a started script's process group once ``count`` shards are finished in
    ``out_dir``; returns the names of the finished shards."""
    deadline = time.time() + timeout
    while len(finished_shards(out_dir)) < count and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return finished_shards(out_dir)

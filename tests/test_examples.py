"""Every Python snippet in README.md is a runnable, tested example, and a fresh clone's first hour works.

* Each ```python block of the README is preceded by ``<!-- example: examples/NAME.py -->`` and equals that file --
  the whole file, or the region between its ``# [readme:start]`` and ``# [readme:end]`` lines (dedented). No
  block is left without its example, no example without its block. ``python tests/test_examples.py --write``
  copies the examples' code into the README's blocks after editing an example.
* Every example runs for real: the single-process ones inside this test process (``runpy``, as ``__main__``, in a
  temporary directory; one torch thread), the distributed ones as 2 gloo processes under ``torch.distributed.run``
  (marker ``dist``). Nothing is downloaded: the models are built from small configs.
* Set-up: the torch version check of ``import zeroadamw`` (the parser on real version strings, and an import under
  an old torch refused with both versions named); pyproject's lower bound equals the check's; ``make -n`` shows
  that ``make demo`` installs only the demo's extra (numpy before torch, no DeepSpeed, no test tools) and that
  ``make test`` after ``make demo`` installs the rest.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
START, END = "# [readme:start]", "# [readme:end]"
MARK = re.compile(r"<!-- example: (\S+) -->\n```python\n(.*?)```\n", re.S)


def example_code(path: Path) -> str:
    """What the README shows of an example: its marked region (dedented), or the whole file."""
    text = path.read_text()
    if START not in text:
        return text.rstrip("\n") + "\n"
    assert text.count(START) == 1 and text.count(END) == 1, f"{path}: one {START} ... {END} region"
    body = text.split(START + "\n", 1)[1].split(END, 1)[0]
    body = body[: body.rfind("\n") + 1]  # up to the line before the end marker (which may be indented)
    return textwrap.dedent(body).rstrip("\n") + "\n"


def readme_blocks(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in MARK.finditer(text)]


# ------------------------------------------------------------------------------------------- README == examples
def test_every_readme_python_block_is_an_example_file():
    text = README.read_text()
    fences = re.findall(r"^```(\S*)", text, re.M)
    python_fences = [f for f in fences if f.lower() in ("python", "py", "python3", "pycon")]
    blocks = readme_blocks(text)
    # every python fence is one of the marked blocks (an unmarked one would be untested)
    assert len(python_fences) == len(blocks), (
        f"{len(python_fences)} python blocks in README.md, {len(blocks)} marked <!-- example: ... -->: "
        "every python block needs its example file")
    assert not [f for f in python_fences if f != "python"], "use ```python for snippets (so they are checked)"
    seen = set()
    for path, code in blocks:
        f = ROOT / path
        assert f.is_file(), f"README points at {path}, which does not exist"
        assert code == example_code(f), (
            f"README block for {path} differs from the example (run: python tests/test_examples.py --write)")
        seen.add(f.name)
    # and every example is shown (so none goes stale unseen)
    assert sorted(seen) == sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_region_extraction(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("a = 1\nif a:\n    # [readme:start]\n    b = 2\n    c = 3\n    # [readme:end]\nd = 4\n")
    assert example_code(f) == "b = 2\nc = 3\n"
    f.write_text("x = 1\n\n\n")
    assert example_code(f) == "x = 1\n"


# ------------------------------------------------------------------------------------------------- running them
@pytest.fixture
def run_example(tmp_path, monkeypatch, capsys):
    """Run examples/NAME as ``python examples/NAME ARGS...`` would, inside this process; return its stdout."""
    threads = torch.get_num_threads()

    def run(name: str, *args: str) -> str:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(k, raising=False)
        torch.set_num_threads(1)
        capsys.readouterr()
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        return capsys.readouterr().out

    yield run
    torch.set_num_threads(threads)
    if "accelerate" in sys.modules:  # Accelerator / Trainer keep process-wide state: the next one starts clean
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def numbers(pattern: str, out: str) -> list[float]:
    return [float(x) for x in re.findall(pattern, out)]


def test_use_sharded_adamw_one_process(run_example):
    out = run_example("use_sharded_adamw.py")
    losses = numbers(r"loss (\d+\.\d+)", out)
    norms = numbers(r"grad_norm (\d+\.\d+)", out)
    assert len(losses) == len(norms) == 8, out  # 128 sequences / batch 4 / accumulation 4
    assert losses[-1] < losses[0] - 0.5, out  # it learns the toy language
    assert all(n > 0 for n in norms)
    assert "done: 1 process(es)" in out


def _torchrun(tmp_path, name: str, *args: str, timeout: float = 300, nproc: int = 2) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(EXAMPLES / name), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.dist
def test_use_sharded_adamw_two_processes(tmp_path):
    out = _torchrun(tmp_path, "use_sharded_adamw.py")
    losses = numbers(r"loss (\d+\.\d+)", out)
    assert len(losses) == 4, out  # each rank: 64 sequences / 4 / 4; only rank 0 prints
    assert losses[-1] < losses[0], out
    state = int(re.search(r"optimizer state on this rank (\d+) bytes", out)[1])
    assert "done: 2 process(es)" in out
    # sharded over 2 ranks: half of AdamW's 8 bytes per param (+ padding of < 2 elements per bucket)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    psi = sum(p.numel() for p in model.parameters())
    assert abs(state - 8 * psi / 2) <= 8 * 2 * 2, (state, psi)


@pytest.mark.dist
def test_multinode_mesh(tmp_path):
    """4 processes as 2 "nodes" of 2: state = AdamW's / 2, counted bytes = the model's, ranks identical."""
    out = _torchrun(tmp_path, "multinode_mesh.py", "2", nproc=4)
    m = re.search(r"state on this rank (\d+) bytes, AdamW's (\d+) / 2", out)
    assert m and int(m[1]) == int(m[2]) // 2, out
    assert out.count("equal: True") == 2 and "every rank holds the same weights: True" in out, out


@pytest.mark.dist
def test_fsdp2(tmp_path):
    out = _torchrun(tmp_path, "fsdp2.py")
    assert "state held as ['DTensor']; equal to torch.optim.AdamW: True" in out, out


def test_hf_trainer(run_example, tmp_path):
    import json

    out = run_example("hf_trainer.py", str(tmp_path / "run"))
    run = tmp_path / "run"
    assert (run / "checkpoint-3" / "zeroadamw_optimizer" / "zeroadamw.json").is_file()
    assert (run / "checkpoint-6" / "zeroadamw_optimizer" / "zeroadamw.json").is_file()
    assert "done: trained to step 6" in out
    recs = [json.loads(x) for x in (run / "diagnostics.jsonl").read_text().splitlines()]
    # logging every 2 steps; the resumed run kept step 2's record and appended 4 and 6
    assert [r["step"] for r in recs] == [2, 4, 6]
    assert all(sum(k.startswith("diag/") for k in r) >= 20 and "loss" in r for r in recs)
    assert len(re.findall(r"^diagnostics step \d+: ", out, re.M)) == 3


def test_accelerate_loop(run_example, tmp_path):
    out = run_example("accelerate_loop.py", str(tmp_path / "acc"))
    norms = numbers(r"grad_norm (\d+\.\d+)", out)
    assert len(norms) == 8 and all(n > 0 for n in norms), out  # 16 batches / accumulation 2
    losses = numbers(r"loss (\d+\.\d+)", out)
    assert losses[-1] < losses[0], out
    assert (tmp_path / "acc" / "state" / "optimizer.bin").is_file()


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_zero_two_processes(tmp_path):
    pytest.importorskip("deepspeed")
    out = _torchrun(tmp_path, "deepspeed_zero.py", timeout=600)
    m = re.search(r"DeepSpeed ZeRO-2, 2 process\(es\), client optimizer (\w+): loss (\d+\.\d+) after 8 steps", out)
    assert m, out
    assert m[1] == "AdamW"  # under ZeRO >= 1 the client is the plain zeroadamw.AdamW (DeepSpeed partitions)
    assert float(m[2]) < 4.8  # from ~4.85 (ln 128) at the start


def test_peft_lora(run_example):
    pytest.importorskip("peft")
    out = run_example("peft_lora.py")
    m = re.search(r"([\d,]+) adapter params of ([\d,]+); optimizer state on this rank ([\d,]+) bytes", out)
    assert m, out
    adapters, total, state = (int(x.replace(",", "")) for x in m.groups())
    # r = 8 on q_proj (64 -> 64) and v_proj (64 -> 32), 2 layers: 8 * (64 + 64) + 8 * (64 + 32) per layer
    assert adapters == 2 * (8 * 128 + 8 * 96) and total > 20 * adapters
    assert state == 8 * adapters  # one process: 8 bytes per adapter element, the frozen base none


def test_step_in_backward(run_example):
    out = run_example("step_in_backward.py")
    rows = re.findall(r"^(.+?)\s+loss (\d+\.\d+) -> (\d+\.\d+)  grad_norm (\d+\.\d+)$", out, re.M)
    assert [r[0] for r in rows] == ["AdamW, fused into backward", "AdamW, exact clipping", "LOMO: SGD", "AdaLomo"]
    for name, first, last, gn in rows:
        assert float(last) < float(first) - 0.2, (name, first, last)  # each rule trains
        assert float(gn) > 0


def test_precision_state(run_example):
    out = run_example("precision_state.py")
    rows = re.findall(r"^(.+?)\s+loss (\d+\.\d+) -> (\d+\.\d+)  state (\d+\.\d+) B/param$", out, re.M)
    assert [r[0] for r in rows] == ["fp32 moments + fp32 master", "int8 moments + fp32 master",
                                    "bf16 moments + Kahan", "int8 + Kahan, in backward"], out
    for name, first, last, _ in rows:
        assert float(last) < float(first) - 0.2, (name, first, last)  # every variant trains
    b = {r[0]: float(r[3]) for r in rows}
    assert b["fp32 moments + fp32 master"] == 12.0 and b["bf16 moments + Kahan"] == 6.0  # 8 + 4; 4 + 2
    # int8: 2.03 B for the tensors of >= 4096 elements, fp32 moments (8 B) for the small ones
    assert 6.0 < b["int8 moments + fp32 master"] < 8.0 and b["int8 + Kahan, in backward"] < 5.0


def test_sparse_moe(run_example):
    out = run_example("sparse_moe.py")
    steps = [int(x) for x in re.search(r"steps taken: \[([\d, ]+)\] of 8", out)[1].split(",")]
    idle = int(re.search(r"idle \(expert, step\) pairs: (\d+)", out)[1])
    assert len(steps) == 8 and sum(8 - s for s in steps) == idle > 0, out  # experts sat out some steps
    assert float(re.search(r"moved in those steps: ([\d.e+-]+)", out)[1]) == 0.0  # ... and did not move then


def test_checkpoint(run_example, tmp_path):
    out = run_example("checkpoint.py", str(tmp_path / "ck"))
    assert "weights after step 5 equal the uninterrupted run's: True" in out, out
    assert (tmp_path / "ck" / "export" / "model.safetensors").is_file()
    sd = torch.load(tmp_path / "ck" / "export" / "optimizer.pt", weights_only=True)
    assert len(sd["state"]) == 6 and all(s["step"] == 3 for s in sd["state"].values())


def test_wd_schedule(run_example):
    import math

    out = run_example("wd_schedule.py")
    rows = re.findall(r"after step +(\d+): weight_decay per group ([\d.e+-]+), ([\d.e+-]+) \(wd_step (\d+)\)", out)
    assert [int(r[0]) for r in rows] == [1, 6, 11, 16, 20]
    for t, wd0, wd1, step in rows:  # printed to 3 significant digits
        t = int(t)
        assert int(step) == t
        assert float(wd0) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * t / 20)), rel=5e-3, abs=1e-12)
        assert float(wd1) == pytest.approx(0.01 * 0.5 ** t, rel=5e-3)


def test_diagnostics_loop(run_example, tmp_path):
    import json

    out = run_example("diagnostics_loop.py", str(tmp_path / "d"))
    recs = [json.loads(x) for x in (tmp_path / "d" / "diag.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(0, 40, 5))
    assert all(r["diag/decay/param_norm"] > 0 and "loss" in r for r in recs)
    assert (tmp_path / "d" / "diag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the corpus: docstrings of deprecated stdlib names
def test_torch_only_demo_says_which_loss_is_which(capsys):
    """``python -m zeroadamw.demo``: its final line names the last step's loss, the run's mean and the validation
    loss (the launcher's final line is checked in tests/test_launch.py)."""
    from zeroadamw.demo import main

    threads = torch.get_num_threads()
    try:
        main(["--steps", "3", "--layers", "1", "--d-model", "32", "--seq-len", "32", "--batch", "2"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.search(r"^rank 0: train loss \d\.\d{3} \(the last step's batch; mean over the run \d\.\d{3}\), "
                     r"validation loss \d\.\d{3} \(one batch after the last step; uniform bytes: 5\.545\)$", out, re.M), out


# ----------------------------------------------------------------------------------------- torch version check
@pytest.mark.parametrize("version, parsed", [
    ("2.13.0+cpu", (2, 13, 0)), ("2.11.0a0+git1234abc", (2, 11, 0)), ("2.12.0.dev20260101+cu128", (2, 12, 0)),
    ("2.11", (2, 11, 0)), ("2.10.2", (2, 10, 2)), ("1.13.1+cu117", (1, 13, 1)), ("3.0.0rc1", (3, 0, 0)),
])
def test_parse_torch_version(version, parsed):
    from zeroadamw import parse_torch_version

    assert parse_torch_version(version) == parsed


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.11.0a0+git1234abc", "2.11.0", "2.12.1", "3.0.0"])
def test_supported_torch_passes(version):
    from zeroadamw import check_torch_version

    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.10.2", "2.10.0a0+gitdeadbee", "2.4.0", "1.13.1+cu117", "garbage", ""])
def test_old_or_unreadable_torch_is_refused_naming_both_versions(version):
    from zeroadamw import MIN_TORCH, check_torch_version

    with pytest.raises(ImportError) as e:
        check_torch_version(version)
    msg = str(e.value)
    assert MIN_TORCH == (2, 11) and "zeroadamw needs torch >= 2.11" in msg
    if version in ("garbage", ""):
        assert f"cannot read the installed torch's version {version!r}" in msg
    else:
        assert f"but torch {version} is installed" in msg


def test_import_under_an_old_torch_fails_with_the_versions():
    code = "import torch; torch.__version__ = '2.4.1+cpu'; import zeroadamw"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ImportError: zeroadamw needs torch >= 2.11, but torch 2.4.1+cpu is installed" in out.stderr


def test_pyproject_lower_bound_is_the_import_check():
    import tomllib

    from zeroadamw import MIN_TORCH

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={'.'.join(map(str, MIN_TORCH))}" in deps, deps
    # and the installer keeps only a torch that new (an older one is replaced, not upgraded by pip's resolver)
    assert f'min="{".".join(map(str, MIN_TORCH))}"' in (ROOT / "scripts" / "install_torch.sh").read_text()


# ------------------------------------------------------------------------------------------------- make targets
def _make_n(target: str, venv: Path) -> list[str]:
    out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_installs_only_the_demo_and_make_test_the_rest(tmp_path):
    venv = tmp_path / "v"
    demo = _make_n("demo", venv)  # a fresh clone: no venv yet
    text = "\n".join(demo)
    assert "-m venv" in text and "install_torch.sh" in text and '".[demo]"' in text and "cpu_demo.sh" in text
    assert "deepspeed" not in text and "[test" not in text and "bench" not in text, text
    numpy_at = next(i for i, l in enumerate(demo) if "pip install -q numpy" in l)
    torch_at = next(i for i, l in enumerate(demo) if "install_torch.sh" in l and "bash" in l)
    assert numpy_at < torch_at  # numpy before anything imports torch (no "Failed to initialize NumPy")
    assert any(l.startswith("echo") for l in demo)  # it says what it is doing
    # after `make demo` (its stamps exist, newer than pyproject.toml): `make test` installs the rest only
    (venv / "bin").mkdir(parents=True)
    for stamp in ("bin/python", ".torch-installed", ".demo-installed"):
        (venv / stamp).touch()
    test = "\n".join(_make_n("test", venv))
    assert '".[test,hf,bench]"' in test and "deepspeed" in test and "pytest" in test
    assert "-m venv" not in test and "install_torch.sh" not in test
    again = "\n".join(_make_n("demo", venv))
    assert "pip install" not in again and "cpu_demo.sh" in again  # the demo's set-up is done


# -------------------------------------------------------------------------------------------------- maintenance
def write_readme() -> int:
    """Copy each example's code into its README block; returns the number of blocks changed."""
    text = README.read_text()
    changed = 0

    def sub(m):
        nonlocal changed
        code = example_code(ROOT / m[1])
        changed += code != m[2]
        return f"<!-- example: {m[1]} -->\n```python\n{code}```\n"

    README.write_text(MARK.sub(sub, text))
    return changed


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print(f"README.md: {write_readme()} example block(s) updated")
    else:
        print(__doc__)

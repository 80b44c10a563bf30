"""Issue 15, converters and writers: every fault a hostile (or unlucky) user can cause, replayed on
real files. Each test hashes what the user owns before and after (sha256 of every file, hidden
ones included, so a leftover temporary counts too) and checks the exact exit code and message.

Exit codes: 2 refused input, 1 failed write, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (128 + signal,
the shell's convention). Signals and disk-full runs go through a real subprocess.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters import merge_lora, to_hf  # noqa: E402
from converters.common import (  # noqa: E402
    MANIFEST,
    atomic_dir,
    check_destination,
    foreign,
    remove_stale_temps,
)
from minimind_core.cli.entry import main as minimind  # noqa: E402

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[1]


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hex), hidden files included."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = Path(dirpath, name)
            out[str(full.relative_to(root))] = hashlib.sha256(full.read_bytes()).hexdigest()
    return out


def save_lora(config, path: Path, nan: bool = False) -> Path:
    """An upstream-format LoRA (q_proj/o_proj, A [r, in], B [out, r]) with non-zero B."""
    rng = np.random.default_rng(3)
    h, state = config.hidden_size, {}
    for i in range(config.num_hidden_layers):
        for name in ("q_proj", "o_proj"):
            key = f"model.layers.{i}.self_attn.{name}.lora"
            state[f"{key}.A.weight"] = torch.from_numpy(rng.standard_normal((4, h)).astype(np.float32))
            state[f"{key}.B.weight"] = torch.from_numpy(rng.standard_normal((h, 4)).astype(np.float32))
    if nan:
        state["model.layers.1.self_attn.o_proj.lora.B.weight"][3, 2] = float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def cli(capsys, *argv) -> tuple[int, str]:
    """``minimind ...`` in this process: (exit code, stderr)."""
    code = minimind([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- 1. inputs are never touched -----------------------------------------------------------------

@pytest.mark.parametrize("to", ["hf", "mlx"])
def test_dst_holding_the_source_is_refused(make_checkpoint, capsys, to):
    """The issue's first fault: ``convert --to hf out/full_sft_512.pth out --force`` deleted out/."""
    path, _, _ = make_checkpoint("minimind2")
    root = path.parent.parent
    before = digest(root)
    code, err = cli(capsys, "convert", "--to", to, path, path.parent, "--force")
    assert code == 2
    assert one_line(err) == (f"minimind: error: destination {path.parent} holds the input {path}, "
                             f"which replacing it would delete; write the output somewhere else")
    # the tokenizer folder, the project root (holds both), and the source itself
    for dst in (root / "model", root, path):
        code, err = cli(capsys, "convert", "--to", to, path, dst, "--force")
        assert code == 2 and "write the output somewhere else" in one_line(err), err
    assert digest(root) == before


def test_dst_equal_to_or_inside_a_folder_source(make_checkpoint, tmp_path, capsys):
    path, _, _ = make_checkpoint("minimind3")
    hf = to_hf.convert(path, tmp_path / "hf", progress=False)
    before = digest(tmp_path)
    assert to_hf.main([str(hf), str(hf), "--force", "--quiet"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: destination {hf} is the input {hf}; write the output somewhere else")
    assert to_hf.main([str(hf), str(hf / "again"), "--quiet"]) == 2
    assert "lies inside the input" in one_line(capsys.readouterr().err)
    # resolved paths: a symlink to the source's folder and a ``..`` detour are that folder
    (tmp_path / "link").symlink_to(path.parent)
    assert to_hf.main([str(path), str(tmp_path / "link"), "--force", "--quiet"]) == 2
    assert f"destination {tmp_path / 'link'} holds the input {path}" in one_line(
        capsys.readouterr().err)
    detour = tmp_path / "hf" / ".." / path.parent.parent.name / "out"
    assert to_hf.main([str(path), str(detour), "--force", "--quiet"]) == 2
    assert "holds the input" in one_line(capsys.readouterr().err)
    # a link elsewhere is never replaced either (its target would be left behind, or followed)
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to(hf)
    assert to_hf.main([str(path), str(tmp_path / "link"), "--force", "--quiet"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: destination {tmp_path / 'link'} is a symbolic link (to {hf}); give the real "
        f"path, or remove the link")
    (tmp_path / "link").unlink()
    assert digest(tmp_path) == before


def test_explicit_tokenizer_and_lora_are_inputs_too(make_checkpoint, tmp_path, capsys):
    path, config, _ = make_checkpoint("minimind2")
    lora = save_lora(config, tmp_path / "adapters" / "lora_x_128.pth")
    tok = path.parent.parent / "model"
    before = digest(tmp_path)
    assert to_hf.main([str(path), str(tmp_path / "adapters"), "--lora", str(lora), "--force",
                       "--quiet"]) == 2
    assert "holds the input" in one_line(capsys.readouterr().err)
    assert to_hf.main([str(path), str(tok), "--tokenizer", str(tok), "--force", "--quiet"]) == 2
    assert f"is the input {tok}" in one_line(capsys.readouterr().err)
    assert digest(tmp_path) == before


def test_merge_lora_never_overwrites_its_input(make_checkpoint, tmp_path, capsys):
    """``merge_lora base.pth l.pth base.pth --force`` overwrote its own input."""
    path, config, _ = make_checkpoint("minimind2")
    lora = save_lora(config, path.parent / "lora" / "lora_x_128.pth")
    before = digest(tmp_path)
    for dst in (path, lora, path.parent / "lora"):
        assert merge_lora.main([str(path), str(lora), str(dst), "--force"]) == 2
        assert "write the output somewhere else" in one_line(capsys.readouterr().err)
    # a hard link is the same file under another name
    os.link(path, tmp_path / "same.pth")
    before = digest(tmp_path)
    assert merge_lora.main([str(path), str(lora), str(tmp_path / "same.pth"), "--force"]) == 2
    assert "is the input" in one_line(capsys.readouterr().err)
    assert digest(tmp_path) == before


# --- 2. --force replaces only an earlier output of ours --------------------------------------------

def test_force_never_empties_a_foreign_folder(make_checkpoint, tmp_path, capsys):
    """``--force`` onto ~/Documents wiped it; now it is refused, saying why, like mlx_lm.convert."""
    path, _, _ = make_checkpoint("minimind2")
    docs = tmp_path / "Documents"
    (docs / "taxes").mkdir(parents=True)
    (docs / "taxes" / "2025.pdf").write_bytes(b"%PDF important")
    (docs / "notes.txt").write_text("keep me")
    before = digest(docs)
    code, err = cli(capsys, "convert", "--to", "hf", path, docs, "--force")
    assert code == 2
    assert one_line(err) == (
        f"minimind: error: destination {docs} was not written by this converter (it holds "
        f"notes.txt, which we did not write); --force replaces only an earlier output of ours "
        f"and never empties another folder: remove it yourself or pick another name")
    code, err = cli(capsys, "convert", "--to", "mlx", path, docs / "notes.txt", "--force")
    assert code == 2 and "is a file, not a folder we wrote" in one_line(err)
    assert digest(docs) == before


def test_force_replaces_our_output_but_not_what_a_user_added(make_checkpoint, tmp_path, capsys):
    path, _, _ = make_checkpoint("minimind3")
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["writer"].startswith("minimind-core converters.to_hf")
    assert set(manifest["files"]) == set(digest(dst)) - {MANIFEST}
    assert foreign(dst) is None
    assert to_hf.main([str(path), str(dst), "--force", "--quiet", "--dtype", "float16"]) == 0
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"
    (dst / "my_finetune_notes.md").write_text("mine")
    before = digest(tmp_path)
    assert to_hf.main([str(path), str(dst), "--force", "--quiet"]) == 2
    assert "it holds my_finetune_notes.md, which we did not write" in capsys.readouterr().err
    assert digest(tmp_path) == before
    (dst / "my_finetune_notes.md").unlink()
    with open(dst / "model.safetensors", "ab") as f:  # a file of ours changed since
        f.write(b"\0" * 8)
    assert foreign(dst) == "model.safetensors changed since we wrote it"


def test_legacy_outputs_and_empty_folders_may_be_replaced(tmp_path):
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"x")
    (legacy / "config.json").write_text(json.dumps({"minimind": {
        "converter": "minimind-core 0.1.0 converters.to_mlx v1"}}))
    assert foreign(legacy) is None  # written before the manifest existed
    (legacy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert foreign(legacy) == f"no {MANIFEST} and no minimind block in its config.json"
    (tmp_path / "empty").mkdir()
    assert check_destination(tmp_path / "empty", force=True) == tmp_path / "empty"
    with pytest.raises(FileExistsError, match="pass force=True"):
        check_destination(tmp_path / "empty", force=False)


# --- 3. atomic: signals, SIGKILL leftovers, a full disk --------------------------------------------

# Runs a converter's main() with its weight writer slowed down: it writes, says "ready" through
# a file, then sleeps, so the test can signal it while the temporary folder exists.
_SLOW = """
import sys, time, pathlib, importlib
module, attr, ready = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
m = importlib.import_module(module)
real = getattr(m.to_hf if hasattr(m, "to_hf") else m, attr)
def slow(*a, **k):
    out = real(*a, **k)
    ready.write_text("ready")
    time.sleep(60)
    return out
setattr(m.to_hf if hasattr(m, "to_hf") else m, attr, slow)
sys.exit(m.main(sys.argv[4:]))
"""


def _start_slow(tmp_path, module, args):
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, module, "write_safetensors", str(ready),
                             *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the converter never reached its write"
        time.sleep(0.05)
    return proc


def _temps(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".minimind-" in p.name)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"),
                                             (signal.SIGHUP, 129, "SIGHUP")])
def test_a_signal_removes_the_temporary_and_keeps_the_old_output(make_checkpoint, tmp_path, sig,
                                                                 code, name):
    path, _, _ = make_checkpoint("minimind2")
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    before = digest(tmp_path / "hf")
    proc = _start_slow(tmp_path, "converters.to_hf", [path, dst, "--force", "--quiet",
                                                      "--dtype", "float16"])
    assert len(_temps(tmp_path)) == 1  # the new folder is being written beside the old one
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == code and one_line(err) == f"interrupted ({name})"
    assert _temps(tmp_path) == [] and digest(tmp_path / "hf") == before


@pytest.mark.slow
def test_merge_lora_ctrl_c_says_interrupted_and_exits_130(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    lora = save_lora(config, tmp_path / "l.pth")
    dst = tmp_path / "merged.safetensors"
    proc = _start_slow(tmp_path, "converters.merge_lora", [path, lora, dst])
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and one_line(err) == "interrupted"
    assert not dst.exists() and _temps(tmp_path) == []


@pytest.mark.slow
def test_sigkill_leftovers_are_removed_by_the_next_run(make_checkpoint, tmp_path):
    path, _, _ = make_checkpoint("minimind2")
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    proc = _start_slow(tmp_path, "converters.to_hf", [path, dst, "--force", "--quiet"])
    proc.kill()
    proc.wait(timeout=30)
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".hf.minimind-tmp-")  # SIGKILL cannot clean up
    assert to_hf.main([str(path), str(dst), "--force", "--quiet"]) == 0
    assert _temps(tmp_path) == [] and foreign(dst) is None


def test_stale_temps_by_name_pid_and_age(tmp_path):
    dst = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    gone = tmp_path / f".out.minimind-tmp-{dead}-abcd1234"
    live = tmp_path / f".out.minimind-tmp-{os.getppid()}-abcd1234"  # a running writer: kept
    moved = tmp_path / f".out.minimind-old-{dead}-abcd1234"          # the previous output, mid-swap
    legacy = tmp_path / ".out.tmp-k2j3h4"                              # before the pid in the name
    other = tmp_path / f".output.minimind-tmp-{dead}-abcd1234"        # another DST's: not ours
    for p in (gone, live, moved, legacy, other):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(legacy / "model.safetensors", (old, old))
    os.utime(legacy, (old, old))
    assert sorted(remove_stale_temps(dst)) == sorted([gone, legacy])
    assert dst.is_dir() and (dst / "model.safetensors").exists()  # the moved output came back
    assert live.exists() and other.exists() and not moved.exists()


def _limited(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
@pytest.mark.parametrize("argv, dst_name", [
    (["converters.to_hf", "{src}", "{dst}", "--force", "--quiet"], "hf"),
    (["converters.merge_lora", "{src}", "{lora}", "{dst}", "--force"], "merged.pth"),
    (["converters.to_mlx", "{src}", "{dst}", "--force", "--quiet", "--dtype", "float32"], "mlx"),
])
def test_a_full_disk_names_dst_and_keeps_the_old_output(make_checkpoint, tmp_path, argv,
                                                        dst_name):
    """RLIMIT_FSIZE makes every write past 200 kB fail with EFBIG, as a full disk would."""
    if dst_name == "mlx":
        pytest.importorskip("mlx.core")
    path, config, _ = make_checkpoint("minimind2")
    lora = save_lora(config, tmp_path / "l.pth")
    dst = tmp_path / dst_name
    args = [a.format(src=path, dst=dst, lora=lora) for a in argv]
    assert importlib.import_module(args[0]).main(args[1:]) == 0  # the previous output
    before = digest(tmp_path)
    run = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=_limited(200_000))
    assert run.returncode == 1
    line = one_line(run.stderr)
    assert line.startswith(f"error: cannot write {dst}: "), line
    assert line.endswith("; the previous output is unchanged"), line
    assert "File too large" in line or "Unable to write" in line, line
    print(line)
    assert digest(tmp_path) == before  # byte-identical, and nothing left beside it


def test_write_error_is_one_oserror_naming_dst(tmp_path):
    import errno

    with pytest.raises(OSError, match=rf"^cannot write {re.escape(str(tmp_path / 'x'))}: No "
                                      rf"space left on device; .* MB free there; nothing was "
                                      rf"written$"):
        with atomic_dir(tmp_path / "x") as tmp:
            (tmp / "a").write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


# --- CLI odds: a path that is not UTF-8 --------------------------------------------------------------

@pytest.mark.slow
def test_non_utf8_bytes_in_paths_work(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    lora = save_lora(config, tmp_path / "l.pth")
    dst = os.fsencode(tmp_path) + b"/hf-\xff\xfe"
    run = subprocess.run([sys.executable, "-m", "minimind_core", "convert", "--to", "hf",
                          os.fsencode(path), dst], cwd=ROOT, capture_output=True)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert run.stdout.decode() == f"wrote {tmp_path}/hf-\\xff\\xfe\n"  # escaped, never a crash
    assert os.path.isdir(dst)
    config_json = json.loads(open(dst + b"/config.json", "rb").read())  # valid UTF-8 JSON
    assert config_json["minimind"]["source"] == str(path)
    merged = os.fsencode(tmp_path) + b"/m\xff.safetensors"
    run = subprocess.run([sys.executable, "-m", "converters.merge_lora", os.fsencode(path),
                          os.fsencode(lora), merged], cwd=ROOT, capture_output=True)
    assert run.returncode == 0 and run.stdout.decode() == f"wrote {tmp_path}/m\\xff.safetensors\n"
    from safetensors import safe_open

    shutil.copyfile(merged, tmp_path / "plain.safetensors")
    with safe_open(str(tmp_path / "plain.safetensors"), "np") as f:  # the stock reader accepts it
        assert f.metadata()["minimind_lora"] == str(lora)
        assert f.get_tensor("model.embed_tokens.weight").shape == (config.vocab_size,
                                                                   config.hidden_size)

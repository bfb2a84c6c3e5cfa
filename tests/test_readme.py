"""README.md as a test (issue 21): every ```bash and ```python block runs, in order, in a temp directory.

`test_readme_runs` runs the blocks as a reader would, against this install, with QIUSUO_SMOKE=1 (every
command's budgets lowered in one place, qiusuo/cli/common.py) and QIUSUO_HOME in the temp directory:

- a ```bash block runs line by line (a trailing backslash joins lines); `source`, `export` and `cd` lines
  carry over to the lines after them, as in one terminal. Every command must exit 0.
- `qiusuo serve ...` runs until Ctrl-C: here it runs in the background, is waited for (/health is 200),
  answers the ```python blocks after it, and gets SIGINT (Ctrl-C) before the next ```bash block or at the
  end, failure included. `qiusuo deploy NAME` returns by itself; the README's own `qiusuo deploy stop`
  ends it, and the cleanup here stops it too when an earlier block failed.
- a ```python block runs as `.venv/bin/python -c BLOCK` (each block stands alone, as printed).
- servers get a free port instead of 8000, which another process on a CI machine may hold: the test checks
  that 8000 is the code's default, then rewrites `127.0.0.1:8000` in the blocks and adds `--port` to
  `qiusuo serve` / `qiusuo deploy NAME` lines. Nothing else in the text is changed.
- what the README says a command prints or writes is checked after it (CHECKS): format, not figures,
  which mean nothing at smoke budgets. ```text blocks (the cluster commands) are shown, not run.

The fast tests below check README's Troubleshooting section against the messages the code prints
(tools/troubleshooting.py) and that the code does print them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND_TIMEOUT = 600  # seconds for one README command (the slowest, `generate --compile`, compiles ~1 min)


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence in README.md


def readme_blocks(text: str) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        if lang is None and line.startswith("```"):
            lang, start, body = line[3:].strip(), i, []
        elif lang is not None and line.startswith("```"):
            blocks.append(Block(lang, "\n".join(body) + "\n", start))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: the fence opened at line {start} is never closed"
    return blocks


def strip_comment(line: str) -> str:
    """`line` without its trailing `# comment` (a # that starts a word outside quotes, as bash reads it)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments, blank lines dropped."""
    commands, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = strip_comment(pending + line).strip(), ""
        if line:
            commands.append(line)
    assert not pending, f"a bash block ends in a continuation: {pending!r}"
    return commands


def test_blocks_and_commands_are_parsed_as_a_reader_reads_them():
    text = ("x\n```bash\na \\\n  --b\n# note\n\nc  # why\nd '#x' \"# y\" e#f # z\n```\n```python\nprint(1)\n```\n"
            "```\nmake demo\n```\n")
    blocks = readme_blocks(text)
    assert [(b.lang, b.line) for b in blocks] == [("bash", 2), ("python", 10), ("", 13)]
    assert bash_commands(blocks[0].code) == ["a    --b", "c", "d '#x' \"# y\" e#f"]
    with pytest.raises(AssertionError):
        readme_blocks("```bash\nopen\n")


def test_every_readme_fence_is_run_or_marked_as_not_runnable():
    """A new block cannot dodge the README test by its language: bash/python run, text is shown only,
    and the one bare block is the two make commands (CI runs `make test` itself)."""
    blocks = readme_blocks(README.read_text())
    assert {b.lang for b in blocks} <= {"bash", "python", "text", ""}
    assert [b.code.split() for b in blocks if b.lang == ""] == [["make", "demo", "make", "test"]]
    assert sum(b.lang in ("bash", "python") for b in blocks) >= 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_ports() -> tuple[int, int]:
    from qiusuo.cli import build_parser
    from qiusuo.deploy.manager import DEFAULT_PORT

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return serve.get_default("port"), DEFAULT_PORT


class Background:
    """`qiusuo serve` as a reader runs it in a terminal: in the foreground until Ctrl-C (here, SIGINT)."""

    def __init__(self, command: str, prelude: str, cwd: Path, env: dict, port: int, log: Path):
        self.command, self.port, self.log = command, port, log
        self.proc = subprocess.Popen(["bash", "-c", f"{prelude}exec {command}"], cwd=cwd, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"`{self.command}` exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"`{self.command}` not healthy after {timeout:.0f} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def run(args: list[str], cwd: Path, env: dict, what: str) -> subprocess.CompletedProcess:
    t = time.perf_counter()
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    print(f"[{time.perf_counter() - t:6.1f} s] {what}")
    assert r.returncode == 0, f"`{what}` exited {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


# ------------------------------------------------------------------ what the README says commands print or write
def check_demo(r, cwd):
    # README: "a before/after table (accuracy, format rate, completion length, wall time, CPU-seconds per
    # accuracy point), writes report.json and a plot ..., and registers the model"
    for row in ("before RL", "after RL", "held-out greedy accuracy", "format rate", "completion length",
                "wall time", "CPU-seconds per accuracy point"):
        assert row in r.stdout, f"the demo's table has no {row!r}:\n{r.stdout}"
    report = json.loads((cwd / "runs/demo/report.json").read_text())
    assert {"accuracy", "pass1", "format_rate"} <= set(report["before"]) and report["after"]
    assert (cwd / "runs/demo/grpo_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert report["registered"] == "qiusuo-demo:seed0" and "registered as qiusuo-demo:seed0" in r.stdout


def check_checkpoint(out):
    return lambda r, cwd: (cwd / out / "final" / "config.json").is_file() or pytest.fail(f"no {out}/final")


def check_eval(r, cwd):
    assert "pass@1" in r.stdout and "pass@4" in r.stdout, r.stdout


def check_generate(r, cwd):
    assert r.stdout.strip(), "generate printed nothing"


def check_models_list(r, cwd):
    assert re.search(r"\badder\b", r.stdout) and "qiusuo-demo" in r.stdout, r.stdout


def check_gguf(r, cwd):
    assert (cwd / "adder.gguf").read_bytes()[:4] == b"GGUF"


def check_deploy(r, cwd, port):
    assert f"http://127.0.0.1:{port}/adder/v1" in r.stdout and "dashboard:" in r.stdout, r.stdout


def check_deploy_status(r, cwd):
    assert re.search(r"^adder\b.*model=adder", r.stdout, re.M) and "replica " in r.stdout, r.stdout


def check_ray_grpo(r, cwd):
    # README: "`rollout_version_lag`, `rollout_stale` and `rollout_retries` are in `metrics.jsonl`"
    rows = [json.loads(x) for x in (cwd / "runs/grpo/metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in rows if "rollout_version_lag" in m]
    assert steps and all({"rollout_stale", "rollout_retries"} <= set(m) for m in steps), rows[-1]


def check_openai_client(code: str):
    """After the README's client snippet: the same request, raw, has both message fields."""
    import httpx

    base = re.search(r'base_url="([^"]+)"', code).group(1)
    body = {"model": "adder", "messages": [{"role": "user", "content": "347+285="}], "max_tokens": 16}
    message = httpx.post(f"{base}/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
    assert "reasoning_content" in message and "content" in message, message


CHECKS = [  # (command pattern, check); a command may match none
    (r"qiusuo demo\b", check_demo),
    (r"qiusuo pretrain .*--out runs/base\b", check_checkpoint("runs/base")),
    (r"qiusuo grpo (?!.*--ray).*--out runs/rl\b", check_checkpoint("runs/rl")),
    (r"qiusuo eval .*--samples 4", check_eval),
    (r"qiusuo generate ", check_generate),
    (r"qiusuo models list", check_models_list),
    (r"qiusuo export gguf .*--out adder\.gguf", check_gguf),
    (r"qiusuo deploy status", check_deploy_status),
    (r"qiusuo grpo .*--ray\b(?!.*--address)", check_ray_grpo),
]


def stop_deployments(cwd: Path, env: dict, home: Path) -> None:
    state = home / "deploy" / "head.json"
    if not state.exists():
        return
    subprocess.run([str(cwd / ".venv/bin/qiusuo"), "deploy", "stop"], cwd=cwd, env=env, capture_output=True,
                   timeout=120)
    if state.exists():  # the head did not stop by itself: end the daemon this test started
        pid = json.loads(state.read_text()).get("pid")
        if pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_runs(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("README's commands run in make's .venv; this Python is not a virtual environment")
    serve_default, deploy_default = default_ports()
    assert serve_default == deploy_default == 8000, "README says both servers take port 8000 by default"
    port = free_port()
    (tmp_path / ".venv").symlink_to(venv)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("QIUSUO_API_KEY", "VIRTUAL_ENV")}
    env.update(QIUSUO_SMOKE="1", QIUSUO_HOME=str(home), PYTHONUNBUFFERED="1")
    prelude, server, ran = "set -euo pipefail\n", None, []
    t0 = time.perf_counter()
    where = run(["bash", "-c", prelude + "source .venv/bin/activate\npython -c 'import qiusuo; print(qiusuo.__file__)'"],
                tmp_path, env, "which qiusuo the README's commands run")
    assert Path(where.stdout.strip()).is_relative_to(ROOT), f"the README would run {where.stdout}, not {ROOT}"
    try:
        for block in readme_blocks(README.read_text()):
            code = block.code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            if block.lang == "bash":
                if server is not None:  # the reader pressed Ctrl-C before typing the next commands
                    server.stop()
                    server = None
                for command in bash_commands(code):
                    if re.match(r"(source|export|cd) ", command):
                        prelude += command + "\n"
                        continue
                    if re.match(r"qiusuo (serve|deploy (?!status|stop)\S+)", command):
                        command += f" --port {port}"
                    ran.append(f"README.md:{block.line}: {command}")
                    if command.startswith("qiusuo serve"):
                        server = Background(command, prelude, tmp_path, env, port, tmp_path / "serve.log")
                        server.wait_ready()
                        print(f"[{time.perf_counter() - t0:6.1f} s since start] {command}: healthy")
                        continue
                    r = run(["bash", "-c", prelude + command], tmp_path, env, command)
                    if re.match(r"qiusuo deploy (?!status|stop)", command):
                        check_deploy(r, tmp_path, port)
                    for pattern, check in CHECKS:
                        if re.match(pattern, command):
                            check(r, tmp_path)
            elif block.lang == "python":
                ran.append(f"README.md:{block.line}: python block")
                run([str(tmp_path / ".venv/bin/python"), "-c", code], tmp_path, env, f"python block at line {block.line}")
                if "chat.completions.create" in code:
                    check_openai_client(code)
    finally:
        if server is not None:
            server.stop()
        stop_deployments(tmp_path, env, home)
        print(f"README test: {len(ran)} commands and blocks in {time.perf_counter() - t0:.0f} s:\n" + "\n".join(ran))
    assert any("qiusuo serve" in x for x in ran) and any("qiusuo deploy stop" in x for x in ran)


# ------------------------------------------------------------------ Troubleshooting: generated, and true
def troubleshooting():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import troubleshooting as t
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return t


def test_troubleshooting_section_matches_the_messages_the_code_prints():
    t = troubleshooting()
    assert t.section(README.read_text()) == t.render(), "run: python tools/troubleshooting.py"
    assert len(t.entries()) == 5


def test_make_test_without_a_compiler_says_so_before_installing():
    t = troubleshooting()
    r = subprocess.run(["make", "-s", "--no-print-directory", "check-cc", "CC=qiusuo-no-such-cc"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.splitlines()[0] == t.make_variable("NO_CC_MSG", CC="qiusuo-no-such-cc")
    ok = subprocess.run(["make", "-s", "check-cc", f"CC={sys.executable}"], cwd=ROOT, capture_output=True,
                        timeout=60)
    assert ok.returncode == 0


def test_serve_on_a_busy_port_is_one_line_and_exit_2(tmp_path, capsys):
    from qiusuo.cli import main
    from qiusuo.cli.common import port_in_use_message

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # the port is checked before the model loads
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "m"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [port_in_use_message("127.0.0.1", port)]


def test_torch_build_check():
    from qiusuo.cli.common import torch_build_problem, torch_mismatch_message

    assert torch_build_problem("torch==" + __import__("torch").__version__.split("+")[0]) is None  # this install
    assert torch_mismatch_message("2.13.0+cpu", "torch==2.13.0", cuda=False) is None
    message, fatal = torch_mismatch_message("2.5.1", "torch==2.13.0", cuda=False)
    assert fatal and "rm -rf .venv" in message
    message, fatal = torch_mismatch_message("2.13.0", "torch==2.13.0", cuda=True)
    assert not fatal and "CUDA build" in message and "download.pytorch.org/whl/cpu" in message


def test_busy_machine_note(monkeypatch, capsys):
    from qiusuo.cli.common import busy_machine_message, note_busy_machine

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 3.0, 2.0))
    assert note_busy_machine(argparse.Namespace(threads=None, device="cpu")) == busy_machine_message(3.2, 2, 1)
    assert capsys.readouterr().err.strip() == busy_machine_message(3.2, 2, 1)
    assert note_busy_machine(argparse.Namespace(threads=2, device="cpu")) is None  # the user chose
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert note_busy_machine(argparse.Namespace(threads=0, device="cpu")) is None
    assert capsys.readouterr().err == ""


def test_chromium_hint_only_when_the_browser_test_was_skipped():
    import conftest

    class Report:
        def __init__(self, reason):
            self.longrepr = ("tests/test_deploy_ray.py", 210, f"Skipped: {reason}")

    assert conftest.chromium_was_skipped([Report("chromium is not installed (Debian: apt-get install -y chromium)")])
    assert not conftest.chromium_was_skipped([Report("needs CUDA")])
    assert conftest.CHROMIUM_HINT == troubleshooting().python_constant("tests/conftest.py", "CHROMIUM_HINT")


def test_smoke_caps_lower_budgets_and_never_raise_them(monkeypatch, capsys):
    from qiusuo.cli import build_parser
    from qiusuo.cli.common import SMOKE_CAPS, apply_smoke

    args = build_parser().parse_args(["eval", "--model", "m", "--task", "arithmetic", "--n", "500", "--samples", "1"])
    monkeypatch.delenv("QIUSUO_SMOKE", raising=False)
    assert apply_smoke(args) == {} and args.n == 500
    monkeypatch.setenv("QIUSUO_SMOKE", "1")
    assert apply_smoke(args) == {"n": (500, SMOKE_CAPS["n"]), "max_tokens": (256, SMOKE_CAPS["max_tokens"])}
    assert args.n == SMOKE_CAPS["n"] and args.samples == 1  # 1 is under the cap: kept
    assert "QIUSUO_SMOKE" in capsys.readouterr().err
    demo = build_parser().parse_args(["demo"])
    apply_smoke(demo)
    assert (demo.pretrain_steps, demo.grpo_steps, demo.eval_problems) == (12, 3, 24)
    monkeypatch.setenv("QIUSUO_SMOKE", "0")
    assert apply_smoke(build_parser().parse_args(["demo"])) == {}


def test_smoke_budgets_build_valid_configs(monkeypatch, tmp_path):
    """Every training command's lowered flags still pass its config's validation (e.g. warmup < steps)."""
    from qiusuo.cli import build_parser
    from qiusuo.cli.common import apply_smoke
    from qiusuo.cli.flags import config_from_args
    from qiusuo.train import config
    from qiusuo.train.demo import DemoConfig

    monkeypatch.setenv("QIUSUO_SMOKE", "1")
    args = build_parser().parse_args(["pretrain", "--preset", "tiny-moe"])
    apply_smoke(args)
    cfg = config_from_args(config.PretrainConfig, args)
    assert (cfg.steps, cfg.batch_size, cfg.warmup_steps) == (3, 16, 1)
    demo = build_parser().parse_args(["demo"])
    apply_smoke(demo)
    assert config_from_args(DemoConfig, demo).grpo_steps == 3

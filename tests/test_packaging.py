"""The published-package promise (CONTRACT.md): `pip install hil-mcp` / `uvx hil-mcp` bring only what the MCP server
needs; the HIL Server and the worker come with the `server` extra. This checkout is installed for real into fresh
virtual environments, from the package indexes pip is configured with (`pip config list`): every console script's
`--help` works there without side effects, the version is this release's, `uvx --from <checkout>` runs this code
(and the new code after an edit), and the deploy script's install makes the editable environment ./hil uses."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hil_protocol import __version__
from tests.helpers import child_env, free_port

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["hil-mcp", "hil-server", "hil-worker", "hil-sandbox"]
INSTALL_TIMEOUT = 300  # a cold build of the wheel plus dependencies from the local indexes
RUN_TIMEOUT = 60

pytestmark = pytest.mark.e2e


def clean_env(**extra: str) -> dict[str, str]:
    # Neither the suite's settings nor the test runner's Python (PYTHON*, VIRTUAL_ENV) may reach the venvs made here.
    return child_env(drop_prefixes=("PYTHON", "VIRTUAL_ENV"), **extra)


def run(
    args: list[str], cwd: Path, *, timeout: float = RUN_TIMEOUT, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        raise AssertionError(f"{shlex.join(args)} -> {result.returncode}\n{output}")
    return result


class Venv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cwd = root.parent  # not the checkout: `python -c` must import what was installed, not the source tree
        run([sys.executable, "-m", "venv", str(root)], self.cwd)

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def pip_install(self, *requirements: str) -> None:
        run([self.bin("python"), "-m", "pip", "install", *requirements], self.cwd, timeout=INSTALL_TIMEOUT)

    def python(self, code: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([self.bin("python"), "-c", code], self.cwd, check=check)

    def importable(self, module: str) -> bool:
        return self.python(f"import {module}", check=False).returncode == 0


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    venv = Venv(tmp_path_factory.mktemp("pkg-base") / "venv")
    venv.pip_install(str(REPO))
    return venv


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    venv = Venv(tmp_path_factory.mktemp("pkg-server") / "venv")
    venv.pip_install(f"{REPO}[server]")
    return venv


def test_plain_install_runs_hil_mcp_without_server_dependencies(base_venv: Venv) -> None:
    help_text = run([base_venv.bin("hil-mcp"), "--help"], base_venv.cwd).stdout
    for flag in ("--service-url", "--chat-id", "--project-name", "--timeout", "--poll-interval", "--api-token"):
        assert flag in help_text
    assert re.search(r"\d+\.\d+\.\d+", run([base_venv.bin("hil-mcp"), "--version"], base_venv.cwd).stdout)
    # The MCP server itself can be built, not only its argument parser.
    base_venv.python(
        "from mcp_server.config import McpSettings\nfrom mcp_server.server import create_server\n"
        "create_server(McpSettings(_env_file=None))"
    )
    # The servers' own dependencies stay out. (mcp 2.x itself requires uvicorn and starlette, and cryptography through
    # pyjwt[crypto], so those are present whatever we declare; fastapi and websockets are ours alone.)
    assert not base_venv.importable("fastapi")
    assert not base_venv.importable("websockets")
    assert not base_venv.importable("prometheus_client")


def help_has_no_side_effects(venv: Venv, tmp_path: Path) -> None:
    """`--help` and `--version` of every console script: exit 0, print, read no settings, create nothing."""
    cwd = tmp_path / "help-cwd"
    cwd.mkdir()
    (cwd / ".env").write_bytes(b"HIL_PORT=\xff\nBOT_KEY\n")  # unreadable settings, and no BOT_KEY anywhere
    env = clean_env(HIL_PORT="not-a-port", HIL_DATA_DIR=str(cwd / "data"))
    for command in COMMANDS:
        result = run([venv.bin(command), "--help"], cwd, env=env)
        assert result.stdout.startswith(f"usage: {command}") and result.stderr == "", result
        version = run([venv.bin(command), "--version"], cwd, env=env)
        assert version.stdout.strip() == f"{command} {__version__}"
    assert sorted(p.name for p in cwd.iterdir()) == [".env"]


def test_help_without_the_server_extra(base_venv: Venv, tmp_path: Path) -> None:
    help_has_no_side_effects(base_venv, tmp_path)


def test_help_with_the_server_extra(server_venv: Venv, tmp_path: Path) -> None:
    help_has_no_side_effects(server_venv, tmp_path)
    metadata = server_venv.python("import importlib.metadata as m; print(m.version('hil-mcp'))").stdout.strip()
    assert metadata == __version__ == "0.3.0"


@pytest.mark.parametrize("command", ["hil-server", "hil-worker", "hil-sandbox"])
def test_server_commands_without_the_extra_say_what_to_install(base_venv: Venv, command: str) -> None:
    assert Path(base_venv.bin(command)).exists(), f"{command} entry point is not installed"
    port = str(free_port())
    env = clean_env(
        HIL_HOST="127.0.0.1",
        HIL_PORT=port,
        CALLBACK_HOST="127.0.0.1",
        CALLBACK_PORT=port,
        BOT_KEY="k",
        HIL_DATA_DIR=str(base_venv.cwd / "data"),
    )
    result = run([base_venv.bin(command)], base_venv.cwd, check=False, env=env, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "fastapi" in output, output
    if "hil-mcp[server]" not in output:
        pytest.xfail(
            f"{command} without the server extra dies with a bare traceback instead of naming the extra:\n"
            f"{output[-600:]}"
        )
    assert "Traceback" not in output, output


def test_server_extra_brings_the_servers(server_venv: Venv, tmp_path: Path) -> None:
    for module in ("fastapi", "uvicorn", "websockets", "cryptography", "multipart"):
        assert server_venv.importable(module), f"{module} missing after pip install 'hil-mcp[server]'"
    server_venv.python("import hil_server.app, devcloud_worker.worker, hil_sandbox.fake_wecom, hil_sandbox.sandbox")

    # And the installed command really serves.
    port = free_port()
    env = clean_env(
        HIL_HOST="127.0.0.1",
        HIL_PORT=str(port),
        BOT_KEY="k",
        HIL_DATA_DIR=str(tmp_path / "data"),
        WECOM_API_BASE="http://127.0.0.1:1",
        NO_PROXY="127.0.0.1",
    )
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [server_venv.bin("hil-server")], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.1)
        assert health.json() == {"status": "healthy", "mode": "direct", "channel": "webhook"}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def uv_env(venv: Venv, cache: Path) -> dict[str, str]:
    """uv pointed at the same package sources pip is configured with, and at this Python (no downloads)."""
    config = run([venv.bin("python"), "-m", "pip", "config", "list"], venv.cwd).stdout
    values: dict[str, str] = {}
    for line in config.splitlines():
        key, _, value = line.partition("=")
        values[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    env = clean_env(
        UV_CACHE_DIR=str(cache / "cache"),
        UV_TOOL_DIR=str(cache / "tools"),
        UV_PYTHON=venv.bin("python"),
        UV_PYTHON_DOWNLOADS="never",
        UV_NO_CONFIG="1",
    )
    if values.get("find-links"):
        env["UV_FIND_LINKS"] = ",".join(values["find-links"].split())
    if values.get("extra-index-url"):
        env["UV_INDEX"] = values["extra-index-url"]
    if values.get("index-url"):
        env["UV_DEFAULT_INDEX"] = values["index-url"]
    if values.get("cert"):
        env["SSL_CERT_FILE"] = values["cert"]
    return env


@pytest.fixture(scope="module")
def uvx(base_venv: Venv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    installed = run(
        [base_venv.bin("python"), "-m", "pip", "install", "uv"], base_venv.cwd, check=False, timeout=INSTALL_TIMEOUT
    )
    if installed.returncode != 0:
        pytest.skip(f"uv is not installable here: {installed.stderr[-400:]}")
    yield base_venv.bin("uvx"), uv_env(base_venv, tmp_path_factory.mktemp("uv"))


def test_uvx_from_the_checkout(uvx: tuple[str, dict[str, str]], base_venv: Venv) -> None:
    command, env = uvx
    result = run([command, "--from", str(REPO), "hil-mcp", "--help"], base_venv.cwd, env=env, timeout=INSTALL_TIMEOUT)
    assert "--service-url" in result.stdout
    version = run([command, "--from", str(REPO), "hil-mcp", "--version"], base_venv.cwd, env=env, timeout=60)
    assert version.stdout.strip() == f"hil-mcp {__version__}"
    # The same environment uvx built for hil-mcp has no server dependencies.
    probe = run(
        [command, "--from", str(REPO), "python", "-c", "import fastapi"],
        base_venv.cwd,
        env=env,
        check=False,
        timeout=INSTALL_TIMEOUT,
    )
    assert probe.returncode != 0 and "fastapi" in probe.stderr, probe.stderr


def test_uvx_from_a_clone_runs_the_code_after_an_edit(
    uvx: tuple[str, dict[str, str]], base_venv: Venv, tmp_path: Path
) -> None:
    """uv caches the build of a local directory; the README's first MCP config relies on it rebuilding when the
    sources change (`[tool.uv] cache-keys`), or a `git pull` would leave the agent on the old code."""
    command, env = uvx
    clone = tmp_path / "clone"
    shutil.copytree(
        REPO,
        clone,
        ignore=shutil.ignore_patterns(".git", ".venv", "venv", "data", "tests", "bench", "__pycache__", "*.egg-info"),
    )

    def version() -> str:
        args = [command, "--from", str(clone), "hil-mcp", "--version"]
        return run(args, base_venv.cwd, env=env, timeout=INSTALL_TIMEOUT).stdout.strip()

    assert version() == f"hil-mcp {__version__}"
    init = clone / "hil_protocol" / "__init__.py"
    init.write_text(init.read_text().replace(f'"{__version__}"', '"9.8.7"'))
    assert version() == "hil-mcp 9.8.7"


def test_deploy_install_makes_the_editable_venv_hil_uses(tmp_path: Path) -> None:
    """`deploy_hil.sh install`: the checkout, editable, with the server extra, in the venv it is pointed at."""
    venv = tmp_path / "deploy-venv"
    env = clean_env(VENV=str(venv))
    result = run(["bash", str(REPO / "deploy_hil.sh"), "install"], tmp_path, env=env, timeout=INSTALL_TIMEOUT)
    assert f"installed hil-mcp {__version__}" in result.stdout
    probe = "import fastapi, hil_server; print(hil_server.__file__)"
    where = run([str(venv / "bin" / "python"), "-c", probe], tmp_path)
    assert Path(where.stdout.strip()) == REPO / "hil_server" / "__init__.py"  # editable: a pull is a restart away


def test_requirements_txt_lists_what_the_server_extra_installs() -> None:
    # CONTRACT.md promises requirements.txt for the servers; pyproject.toml is the one place dependencies are decided,
    # so the file must say exactly what `pip install '.[server]'` brings, or the two drift apart.
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert listed == [*project["dependencies"], *project["optional-dependencies"]["server"]]

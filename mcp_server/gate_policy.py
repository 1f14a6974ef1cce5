"""Which of Claude Code's tool calls need a person: the gate's policy file and the pure rules that read a call.

The policy is a TOML file the user edits: `.hil/gate.toml` in the project (Claude Code's `cwd`), else
`~/.config/hil/gate.toml`, else the built-in defaults. A file that does not parse or names an unknown setting is an
error (`PolicyError`): the gate then denies, so a typo never opens the gate.

Bash commands are read the way a shell splits them, so a risky program is found wherever it hides: after `;`, `&&`,
`|` or a newline, inside `$(…)` or backticks, behind `FOO=1`, `sudo`, `env`, `xargs`, `bash -c "…"` or `eval`, or
named by a full path (/usr/bin/git). A command whose program is only known at run time (`$CMD push`) or that cannot
be read (an open quote) needs a person. This is a tripwire for an agent's ordinary mistakes, not a sandbox: code an
interpreter runs (`python -c "os.system(…)"`) is not looked into.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hil_protocol.validation import problems

PROJECT_POLICY = Path(".hil") / "gate.toml"
POLICY_MAX_BYTES = 256 * 1024

# Command patterns that need a person unless the policy says `[bash] defaults = false`. A pattern is words: the first
# is a glob on the program's name (its path dropped), the others must appear among its arguments in this order;
# `-r` matches any cluster of short options holding r (`-rf`, `-fr`).
DEFAULT_COMMANDS = (
    "git push",
    "git reset --hard",
    "git clean -f",
    "rm -r",
    "rm -R",
    "rm --recursive",
    "find -delete",
    "dd",
    "mkfs*",
    "kubectl",
    "helm",
    "terraform apply",
    "terraform destroy",
    "pulumi up",
    "pulumi destroy",
    "*deploy*",
    "docker push",
    "npm publish",
    "twine upload",
    "psql",
    "mysql",
    "mariadb",
    "mongo",
    "mongosh",
    "redis-cli",
    "sqlcmd",
    "dropdb",
)
READ_ONLY_TOOLS = (
    "Read",
    "Grep",
    "Glob",
    "LS",
    "NotebookRead",
    "TodoWrite",
    "TodoRead",
    "WebSearch",
    "BashOutput",
    "KillShell",
    "ExitPlanMode",
    "AskUserQuestion",
    "ListMcpResourcesTool",
    "ReadMcpResourceTool",
)
WRITE_TOOLS = {"Write": "file_path", "Edit": "file_path", "MultiEdit": "file_path", "NotebookEdit": "notebook_path"}
# Files that decide what the gate and Claude Code allow: changing them needs a person, whatever the policy says.
GUARDED_NAMES = ("gate.toml", ".claude/settings.json", ".claude/settings.local.json", ".mcp.json", ".claude.json")

# Programs that run the rest of their arguments as another command.
WRAPPERS = frozenset(
    {
        "sudo", "doas", "env", "nohup", "time", "nice", "ionice", "timeout", "stdbuf", "xargs", "exec", "command",
        "builtin", "strace", "ltrace", "watch", "chrt", "taskset", "setsid", "unbuffer", "busybox", "find", "ssh",
        "flock", "parallel", "caffeinate", "chroot", "runuser", "systemd-run", "npx", "uvx", "pipx",
    }
)  # fmt: skip
SHELLS = frozenset({"sh", "bash", "zsh", "dash", "ksh", "mksh", "fish", "ash", "csh", "tcsh", "su"})
DOWNLOADERS = frozenset({"curl", "wget", "fetch", "aria2c", "http", "https"})
INTERPRETERS = SHELLS | {"python", "python2", "python3", "perl", "ruby", "node", "php", "source", "."}
KEYWORDS = frozenset(
    {"{", "}", "!", "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "time", "[[", "]]"}
)
SEPARATORS = frozenset({";", "&", "&&", "|", "||", "|&", ";;", "\n", "(", ")", "((", "))"})
REDIRECTS = frozenset({">", ">>", "<", "<<", "<<<", ">&", "&>", "&>>", "<>", ">|", "<&"})
ASSIGNMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\+?=")
COMMAND_MAX_CHARS = 64 * 1024
DEPTH_MAX = 6
DYNAMIC = "运行时才确定的命令"
UNREADABLE = "无法解析的命令"
GUARDED = "修改审批或权限设置"
# Rules a person may approve once but not for a whole session: each would wave through calls nobody has seen.
ONCE_ONLY = frozenset({DYNAMIC, UNREADABLE, GUARDED})


class PolicyError(Exception):
    """The policy file cannot be used; `str()` names the file and what to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolsPolicy(_Section):
    ask: list[str] = Field(default_factory=list, description="tools (globs) that always need a person")
    never: list[str] = Field(default_factory=lambda: list(READ_ONLY_TOOLS), description="tools never asked about")


class BashPolicy(_Section):
    defaults: bool = True  # keep DEFAULT_COMMANDS
    ask: list[str] = Field(default_factory=list, description="more command patterns that need a person")
    pipe_to_shell: bool = True  # curl … | sh

    @field_validator("ask")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.split():
                raise ValueError("a command pattern may not be empty")
        return value

    def patterns(self) -> list[str]:
        return [*(DEFAULT_COMMANDS if self.defaults else ()), *self.ask]


class FilesPolicy(_Section):
    outside_project: bool = True  # Write/Edit (and shell redirections) outside the project folder need a person


class NotifyPolicy(_Section):
    notification: bool = False  # Claude Code waits for the person (Notification hook)
    stop: bool = False  # the task finished (Stop hook)
    interval: float = Field(default=60.0, ge=0, le=24 * 3600, description="seconds between two notices of a kind")


class Policy(_Section):
    chat_id: str | None = None
    project_name: str | None = None
    responders: list[str] = Field(default_factory=list)
    approvals_required: int = Field(default=1, ge=1, le=10)
    wait: float = Field(default=300.0, ge=1, le=3600, description="seconds to wait for a decision")
    on_timeout: Literal["deny", "ask"] = "deny"
    tools: ToolsPolicy = Field(default_factory=ToolsPolicy)
    bash: BashPolicy = Field(default_factory=BashPolicy)
    files: FilesPolicy = Field(default_factory=FilesPolicy)
    notify: NotifyPolicy = Field(default_factory=NotifyPolicy)
    source: str = Field(default="built-in defaults", exclude=True)


def policy_paths(cwd: str | None, home: Path | None = None) -> list[Path]:
    """Where the policy is looked for, first found wins."""
    paths = [Path(cwd) / PROJECT_POLICY] if cwd else []
    config = os.environ.get("XDG_CONFIG_HOME") or str((home or Path.home()) / ".config")
    return [*paths, Path(config) / "hil" / "gate.toml"]


def load_policy(cwd: str | None, home: Path | None = None) -> Policy:
    """The policy for a call made in `cwd`. Raises PolicyError."""
    for path in policy_paths(cwd, home):
        try:
            raw = path.read_bytes() if path.is_file() else None
        except OSError as exc:
            raise PolicyError(f"cannot read the gate policy {path}: {exc.strerror}") from exc
        if raw is None:
            continue
        return parse_policy(raw, str(path))
    return Policy()


def parse_policy(raw: bytes, source: str) -> Policy:
    if len(raw) > POLICY_MAX_BYTES:
        raise PolicyError(f"the gate policy {source} is larger than {POLICY_MAX_BYTES // 1024} KB")
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"the gate policy {source} is not valid TOML: {exc}") from exc
    try:
        policy = Policy.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise PolicyError(f"the gate policy {source} is invalid: {problems(exc.errors())}") from exc
    return policy


# --- reading a call -------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """Whether a call needs a person, and why: `rules` (what the person reads) and `keys` (what 本会话都允许 covers)."""

    rules: list[str] = field(default_factory=list)
    tool: str = ""

    @property
    def needs_person(self) -> bool:
        return bool(self.rules)

    @property
    def session_allowable(self) -> bool:
        """Whether 本会话都允许 may be offered for these rules."""
        return not ONCE_ONLY & set(self.rules)

    @property
    def keys(self) -> list[str]:
        return [f"{self.tool}: {rule}" for rule in self.rules]

    def add(self, rule: str) -> None:
        if rule not in self.rules:
            self.rules.append(rule)


def check_call(tool_name: str, tool_input: dict[str, Any], cwd: str, policy: Policy) -> Verdict:
    """Which rules of `policy` the call matches (none: no person needed)."""
    verdict = Verdict(tool=tool_name)
    if _matches_any(tool_name, policy.tools.ask):
        verdict.add("需要审批的工具")
    if _matches_any(tool_name, policy.tools.never) and not verdict.rules:
        return verdict
    if tool_name == "Bash":
        command = tool_input.get("command")
        if not isinstance(command, str):
            verdict.add(UNREADABLE)
        else:
            for rule in check_command(command, cwd, policy):
                verdict.add(rule)
    elif tool_name in WRITE_TOOLS:
        path = tool_input.get(WRITE_TOOLS[tool_name])
        if not isinstance(path, str) or not path:
            verdict.add("没有文件路径")
        else:
            if _guarded(path):
                verdict.add(GUARDED)
            if policy.files.outside_project and not inside(path, cwd):
                verdict.add("写项目目录之外的文件")
    return verdict


def _matches_any(name: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


def _guarded(text: str) -> bool:
    return any(name in text.replace("\\", "/") for name in GUARDED_NAMES)


def inside(path: str, cwd: str) -> bool:
    """Whether `path` (absolute, or relative to `cwd`) is within the project folder, after `..` and symlinks."""
    if not cwd or "\x00" in path or "\x00" in cwd:
        return False
    project = os.path.realpath(cwd)
    target = os.path.realpath(os.path.join(project, os.path.expanduser(path)))
    return os.path.commonpath([project, target]) == project


def check_command(command: str, cwd: str, policy: Policy) -> list[str]:
    """The rules a shell command line matches."""
    scan = _Scan(cwd, policy)
    scan.line(command, depth=0)
    if policy.bash.pipe_to_shell and scan.programs & DOWNLOADERS and scan.programs & INTERPRETERS:
        scan.found.append("下载后交给 shell 执行（curl | sh）")
    if _guarded(command):
        scan.found.append(GUARDED)
    return list(dict.fromkeys(scan.found))


def split_tokens(command: str) -> list[str]:
    """The command's words and operators as a POSIX shell splits them (quotes removed); newlines are separators."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()<>\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    lexer.commenters = ""
    tokens: list[str] = []
    for token in lexer:
        # shlex joins a run of operator characters (`);`, `&&(`): split it into the shell's operators.
        if token and set(token) <= _OPERATOR_CHARS:
            tokens += _OPERATOR_RE.findall(token)
        else:
            tokens.append(token)
    return tokens


_OPERATOR_CHARS = set(";&|()<>\n")
_OPERATOR_RE = re.compile(r"<<<|&>>|&&|\|\||;;|\|&|>>|<<|&>|>&|<&|<>|>\||[;&|()<>\n]")


def substitutions(command: str) -> list[str]:
    """The text inside every `$(…)`, `<(…)`, `>(…)` and `` `…` `` (an open one: the rest of the command)."""
    found: list[str] = []
    i = 0
    while i < len(command):
        if command.startswith(("$(", "<(", ">("), i):
            depth, j = 1, i + 2
            while j < len(command) and depth:
                depth += {"(": 1, ")": -1}.get(command[j], 0)
                j += 1
            found.append(command[i + 2 : j - 1 if depth == 0 else j])
            i = j
        elif command[i] == "`":
            end = command.find("`", i + 1)
            found.append(command[i + 1 : end if end >= 0 else len(command)])
            i = end + 1 if end >= 0 else len(command)
        else:
            i += 1
    return found


@dataclass
class _Scan:
    cwd: str
    policy: Policy
    found: list[str] = field(default_factory=list)
    programs: set[str] = field(default_factory=set)
    # Wrappers are tried at every argument: a budget keeps `sudo sudo sudo …` from growing without bound.
    budget: int = 20_000

    def spend(self, cost: int) -> bool:
        self.budget -= cost
        if self.budget < 0:
            self.found.append(UNREADABLE)
            return False
        return True

    def line(self, command: str, depth: int) -> None:
        if depth > DEPTH_MAX or len(command) > COMMAND_MAX_CHARS:
            self.found.append(UNREADABLE)
            return
        # Command substitutions run wherever they stand, even inside double quotes: read each as a command too.
        for inner in substitutions(command):
            self.line(inner, depth + 1)
        try:
            tokens = split_tokens(command)
        except ValueError:
            self.found.append(UNREADABLE)
            return
        words: list[str] = []
        redirect = False
        for token in [*tokens, ";"]:
            if token in SEPARATORS:
                self.simple(words, depth)
                words = []
            elif token in REDIRECTS:
                redirect = True
            elif redirect:
                redirect = False
                self.redirect_to(token)
            else:
                words.append(token)

    def redirect_to(self, target: str) -> None:
        if not self.policy.files.outside_project or target.startswith("/dev/") or target.isdigit():
            return
        if not inside(target, self.cwd):
            self.found.append("写项目目录之外的文件")

    def simple(self, words: list[str], depth: int) -> None:
        """One simple command (no operators left)."""
        if not self.spend(len(words) + 1):
            return
        while words and (words[0] in KEYWORDS or ASSIGNMENT_RE.match(words[0])):
            words = words[1:]
        if not words:
            return
        first = words[0]
        if any(ch in first for ch in "$`*?[") or not first.strip():
            self.found.append(DYNAMIC)
            return
        program = first.rstrip("/").rsplit("/", 1)[-1]
        self.programs.add(program)
        args = words[1:]
        for pattern in self.policy.bash.patterns():
            if _pattern_matches(pattern, program, args):
                self.found.append(pattern)
        if depth >= DEPTH_MAX:
            return
        if program in SHELLS or program == "eval":
            script = _shell_script(program, args)
            if script is not None:
                self.line(script, depth + 1)
        if program in WRAPPERS:
            # Which argument starts the wrapped command depends on each wrapper's options: try every one that could.
            for i, word in enumerate(args):
                if not word.startswith("-") and not ASSIGNMENT_RE.match(word):
                    self.simple(args[i:], depth + 1)


def _shell_script(program: str, args: list[str]) -> str | None:
    if program == "eval":
        return " ".join(args)
    for i, word in enumerate(args):
        if word.startswith("-") and not word.startswith("--") and "c" in word[1:]:
            rest = [a for a in args[i + 1 :] if not a.startswith("-")]
            return rest[0] if rest else None
    return None


def _pattern_matches(pattern: str, program: str, args: list[str]) -> bool:
    head, *wanted = pattern.split()
    if not fnmatch.fnmatchcase(program, head):
        return False
    position = 0
    for word in wanted:
        while position < len(args) and not _word_matches(word, args[position]):
            position += 1
        if position == len(args):
            return False
        position += 1
    return True


def _word_matches(word: str, arg: str) -> bool:
    if fnmatch.fnmatchcase(arg, word):
        return True
    if re.fullmatch(r"-[A-Za-z]+", word) and re.fullmatch(r"-[A-Za-z]+", arg):
        return set(word[1:]) <= set(arg[1:])
    # `git -c alias.p=push p`: the word inside a config value or a ref still counts.
    return not word.startswith("-") and word in re.split(r"[=.,:/]", arg)


def describe_rules(verdict: Verdict) -> str:
    return "、".join(verdict.rules)


__all__ = [
    "DEFAULT_COMMANDS",
    "Policy",
    "PolicyError",
    "Verdict",
    "check_call",
    "check_command",
    "inside",
    "load_policy",
    "parse_policy",
    "policy_paths",
]

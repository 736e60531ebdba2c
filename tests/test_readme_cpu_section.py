"""The README's "On a CPU" section is the demo's command sequence spelled out; this test keeps the two
from drifting: every command of the section's code block is a command of scripts/demo.sh (with the
script's variables expanded to their defaults), and every nnU-Net / nnunet-liver command of the demo
is in the section. The demo itself runs the commands, so the section is executed whenever the demo is.
"""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# where the README's copy of the commands puts the demo's work folder
README_WORK = "demo_work"
# a command of ours or nnU-Net's, possibly behind VAR=value settings for it alone
COMMAND = re.compile(r"\s*(\w+=\S+\s+)*(nnunet-liver|nnUNetv2_)")


def _logical_lines(text: str):
    """Lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _command(line: str) -> str:
    """The command of a shell line, without redirections, pipes, error handlers and quotes."""
    for cut in (" > ", " 2>&1", " | ", " || "):
        if cut in line:
            line = line[:line.index(cut)]
    return " ".join(line.replace('"', "").split())


def _demo_commands() -> list:
    script = (REPO / "scripts" / "demo.sh").read_text()
    values = {"work": README_WORK, "repo": "."}
    for line in _logical_lines(script):
        match = re.fullmatch(r"\s*(\w+)=(.+)", line)
        if match and not line.lstrip().startswith("export"):
            name, value = match.groups()
            default = re.fullmatch(r'\$\{\w+:-(.*)\}', value.strip('"'))
            values.setdefault(name, default.group(1) if default else value.strip('"'))

    def expand(text: str) -> str:
        for _ in range(3):  # values refer to each other ($dataset uses $id)
            text = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)
        return text

    return [expand(_command(line)) for line in _logical_lines(script) if COMMAND.match(line)]


def _readme_commands() -> list:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## On a CPU"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    return [_command(line) for line in _logical_lines(block) if line.strip() and not line.lstrip().startswith("#")]


def test_readme_cpu_section_is_the_demo_command_sequence():
    demo, readme = _demo_commands(), _readme_commands()
    assert len(demo) >= 5
    missing_from_demo = [c for c in readme if COMMAND.match(c) and c not in demo]
    assert not missing_from_demo, f"README 'On a CPU' commands the demo does not run: {missing_from_demo}\n{demo}"
    missing_from_readme = [c for c in demo if c not in readme]
    assert not missing_from_readme, f"demo commands missing from README 'On a CPU': {missing_from_readme}"

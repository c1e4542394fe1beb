"""Print the README Quickstart's commands: `demo` (the first) or `test` (the second)."""

import sys
from pathlib import Path


def quickstart_commands(readme: Path) -> list[str]:
    lines, in_section, in_code, commands = readme.read_text().splitlines(), False, False, []
    for line in lines:
        s = line.strip()
        if s.startswith("```"):
            in_code = not in_code
            continue
        if not in_code and s.startswith("#"):
            if in_section:
                break
            in_section = "quickstart" in s.lower()
            continue
        if in_section and in_code and s and not s.startswith("#"):
            commands.append(s)
    if len(commands) != 2:
        sys.exit(f"README Quickstart must hold exactly two commands; found {commands}")
    return commands


if __name__ == "__main__":
    demo, test = quickstart_commands(Path(__file__).resolve().parents[1] / "README.md")
    print({"demo": demo, "test": test}[sys.argv[1]])

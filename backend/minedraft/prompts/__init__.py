"""The prompt sets the tools measure with, by name (`--prompts demo_pair`) or any JSONL of
{"prompt": ...} lines by path.

- demo_pair: 634 prompts from the Python modules held out of the demo pair's training, each a
  function or method signature plus its docstring (docs/demo-pair.md).
- heldout: 40 hand-written prompts, 10 per category (code, chat, summarisation, maths), held out
  of every draft's training; what the real pairs are measured on (docs/qwen-coder.md).
"""
from pathlib import Path

PROMPT_SETS = {path.stem: path for path in sorted(Path(__file__).parent.glob("*.jsonl"))}


def prompts_path(name_or_path: str | Path) -> Path:
    """A prompt set's file: a name in PROMPT_SETS, else a path to a JSONL file."""
    if str(name_or_path) in PROMPT_SETS:
        return PROMPT_SETS[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts: {name_or_path} is neither a prompt set ({', '.join(PROMPT_SETS)}) "
                                "nor a file")
    return path

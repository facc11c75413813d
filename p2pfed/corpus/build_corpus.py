"""Rebuild the built-in corpus from the chatterbot-corpus 1.3.3 wheel's YAML files.

Usage: python p2pfed/corpus/build_corpus.py DATA_DIR [--out DIR]
where DATA_DIR is the wheel's chatterbot_corpus/data (one sub-folder of *.yml per language).

Kept in the repository so the shipped .txt files can be derived again; the package never imports
it (nor yaml) at run time. Output: one utterance per line, a blank line between conversations.
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path

import yaml

# The peers' groups: one file each.
GROUP_LANGUAGES = ("english", "italian", "spanish", "portuguese")
# Generic pretraining text: Latin-script languages disjoint from the groups. Hinglish is left
# out because it is half English, which would leak the english group into the base model.
PRETRAIN_LANGUAGES = ("german", "french", "dutch", "swedish", "turkish", "indonesian", "yoruba")
# A pretraining conversation repeating any group utterance this long is dropped (no leakage).
MIN_SHARED_CHARS = 20

Conversation = tuple[str, ...]


def normalize(utterance: str) -> str:
    # NFC so one character is always the same bytes; whitespace runs (multi-line code blocks)
    # collapse so that one utterance is exactly one line.
    return " ".join(unicodedata.normalize("NFC", utterance).split())


def read_language(directory: Path) -> tuple[list[Conversation], int]:
    """Conversations of every *.yml file in sorted order, and how many malformed entries were skipped."""
    conversations: list[Conversation] = []
    skipped = 0
    for path in sorted(directory.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for entry in document.get("conversations") or []:
            # A few entries are a bare string (a missing "- -" in the source): not a dialog, skip.
            if not isinstance(entry, list):
                skipped += 1
                continue
            utterances = tuple(u for u in (normalize(str(x)) for x in entry if x is not None) if u)
            if utterances:
                conversations.append(utterances)
    return conversations, skipped


def deduplicate(conversations: list[Conversation]) -> list[Conversation]:
    return list(dict.fromkeys(conversations))  # keeps the first occurrence, in order


def render(conversations: list[Conversation]) -> str:
    return "\n\n".join("\n".join(c) for c in conversations) + "\n"


def build(data_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write <group>.txt and pretrain.txt into out_dir; returns each file's size in bytes."""
    missing = [lang for lang in GROUP_LANGUAGES if not (data_dir / lang).is_dir()]
    if missing:
        raise SystemExit(f"{data_dir}: no folder for {', '.join(missing)}")
    sizes: dict[str, int] = {}
    group_lines: set[str] = set()
    for language in GROUP_LANGUAGES:
        conversations, skipped = read_language(data_dir / language)
        conversations = deduplicate(conversations)
        group_lines.update(u for c in conversations for u in c)
        sizes[f"{language}.txt"] = _write(out_dir / f"{language}.txt", render(conversations))
        print(f"{language}: {len(conversations)} conversations, {skipped} malformed skipped", file=sys.stderr)

    pretrain: list[Conversation] = []
    for language in PRETRAIN_LANGUAGES:
        if (data_dir / language).is_dir():
            pretrain.extend(read_language(data_dir / language)[0])
    pretrain = deduplicate(pretrain)
    kept = [c for c in pretrain
            if not any(len(u) >= MIN_SHARED_CHARS and u in group_lines for u in c)]
    print(f"pretrain: {len(kept)} conversations, {len(pretrain) - len(kept)} dropped as shared with the groups",
          file=sys.stderr)
    sizes["pretrain.txt"] = _write(out_dir / "pretrain.txt", render(kept))
    return sizes


def _write(path: Path, text: str) -> int:
    data = text.encode("utf-8")
    path.write_bytes(data)  # bytes, not text mode: "\n" line ends on every platform
    return len(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="chatterbot_corpus/data from the chatterbot-corpus wheel")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: this script's folder, p2pfed/corpus)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, size in build(args.data_dir, args.out).items():
        print(f"{size:8d}  {name}")


if __name__ == "__main__":
    main()

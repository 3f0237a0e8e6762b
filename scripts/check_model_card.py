"""Checks a model card we wrote (README.md of an adapter or merged folder) as the Hugging Face Hub reads it:
huggingface_hub's ModelCard parses the YAML header into ModelCardData, and the fields the Hub uses are there.

    /work/pyenv/bin/python scripts/check_model_card.py runs/demo/README.md [runs/merged/README.md ...]
"""
import sys

from huggingface_hub import ModelCard


def check(path):
    with open(path, encoding="utf-8") as f:
        card = ModelCard(f.read())  # parsed here: ModelCard.load would ask the Hub for a path it does not find
    data = card.data.to_dict()
    assert data.get("base_model"), f"{path}: no base_model"
    assert data.get("library_name") in ("peft", "transformers"), f"{path}: library_name {data.get('library_name')!r}"
    assert isinstance(data.get("tags"), list) and data["tags"], f"{path}: no tags"
    if data["library_name"] == "peft":
        assert f"base_model:adapter:{data['base_model']}" in data["tags"], f"{path}: no base_model:adapter tag"
    for section in ["## Base model", "## Training recipe", "## Data", "## Evaluation", "## Prompt format", "## How to load"]:
        assert section in card.text, f"{path}: no '{section}'"
    print(f"{path}: ok ({data['library_name']}, base_model {data['base_model']}, {len(data['tags'])} tags)")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        check(p)

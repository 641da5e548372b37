"""USPTO-50K reaction-class loaders: the Schneider CSV and the paper's JSON.

- Schneider CSV: columns `rxn_Class, rxn_Smiles` (plus optional `patentID`).
- The paper's JSON: `{instruction, question, rxn_smiles, prod_smiles, id,
  class, class_name, label_str}`; `rxn_smiles` and `class` are required.

Normalised example: `{"id", "question", "rxn_smiles", "answer", "labels",
"class", "class_name", "patent_id", "instruction", "solution", "source"}`
where `answer` is the class number as text and `labels == [answer]`.
"""

from __future__ import annotations

from ophsd_jax.data.errors import LoadReport
from ophsd_jax.data.records import Row, collect, example_id, read_csv, read_json_or_jsonl

# The USPTO-50K reaction-type taxonomy (Schneider et al.).
CLASS_NAMES = {
    1: "heteroatom alkylation and arylation",
    2: "acylation and related processes",
    3: "C-C bond formation",
    4: "heterocycle formation",
    5: "protections",
    6: "deprotections",
    7: "reductions",
    8: "oxidations",
    9: "functional group interconversion (FGI)",
    10: "functional group addition (FGA)",
}


def _reaction_class(row: Row, field: str) -> int:
    value = row.integer(field)
    if value not in CLASS_NAMES:
        raise row.error(field, f"unknown reaction class {value} (expected 1-{len(CLASS_NAMES)})")
    return value


def _reaction_smiles(row: Row, field: str) -> str:
    smiles = row.text(field).strip()
    if any(c.isspace() for c in smiles):
        raise row.error(field, f"whitespace inside reaction SMILES: {smiles!r:.60}")
    parts = smiles.split(">")
    if len(parts) != 3 or not parts[0].strip() or not parts[2].strip():
        raise row.error(field, f"not a reaction SMILES 'reactants>>products': {smiles!r:.60}")
    return smiles


def _example(row: Row, smiles: str, cls: int, patent_id: str, instruction: str, source: str) -> dict:
    return {
        "id": example_id(row),
        "question": smiles,
        "rxn_smiles": smiles,
        "answer": str(cls),
        "labels": [str(cls)],
        "class": cls,
        "class_name": CLASS_NAMES[cls],
        "patent_id": patent_id,
        "instruction": instruction,
        "solution": "",
        "source": source,
    }


def load_uspto_csv(path, *, on_error: str = "raise") -> tuple[list[dict], LoadReport]:
    def read_rows(p, on_err, report):
        return read_csv(p, ("rxn_Class", "rxn_Smiles"), on_err, report)

    def parse(row: Row) -> dict:
        smiles = _reaction_smiles(row, "rxn_Smiles")
        cls = _reaction_class(row, "rxn_Class")
        return _example(row, smiles, cls, row.optional_text("patentID").strip(), "", "uspto_csv")

    return collect(path, on_error, read_rows, parse)


def load_uspto_json(path, *, on_error: str = "raise") -> tuple[list[dict], LoadReport]:
    def parse(row: Row) -> dict:
        smiles = _reaction_smiles(row, "rxn_smiles")
        cls = _reaction_class(row, "class")
        patent = row.obj.get("id")
        patent_id = "" if patent is None else str(patent)
        return _example(row, smiles, cls, patent_id, row.optional_text("instruction").strip(), "uspto_json")

    return collect(path, on_error, read_json_or_jsonl, parse)

from pathlib import Path

from gptforge.config.loader import section_types
from gptforge.config.reference import field_docs, markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_every_config_field_has_a_docstring():
    import dataclasses

    for section, cls in section_types().items():
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, f"[{section}] fields without a docstring: {missing}"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text() == markdown(), \
        "regenerate with: python -m gptforge.config.reference > docs/config.md"

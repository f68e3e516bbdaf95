"""The message catalogues: complete, consistent with the code, and used by every page."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from babel.messages.extract import extract_from_dir

from probe_server import i18n, survey
from probe_server.config import Config
from probe_server.i18n import Message, Pages, direction, languages, read_catalogue, read_template

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("en", "hi", "ja", "tr")  # English first, then sorted
TRANSLATED = SHIPPED[1:]
PLACEHOLDER = re.compile(r"%\([a-z_]+\)[sd]")


def extracted() -> set[str]:
    """Every message of the code and templates, as `make messages` finds them."""
    method_map = [
        ("probe_server/**.py", "python"),
        ("probe_server/templates/**.html", "jinja2"),
    ]
    found = set()
    for _, _, message, _, _ in extract_from_dir(
        str(ROOT), method_map=method_map, keywords={"N_": None, "gettext": None, "_": None}
    ):
        found.add(message if isinstance(message, str) else message[0])
    return found


def test_the_shipped_languages():
    assert languages() == SHIPPED
    assert {direction(language) for language in SHIPPED} == {"ltr"}
    # dir comes from CLDR: a right-to-left language would get rtl.
    assert direction("ar") == "rtl" and direction("he") == "rtl"


def test_the_template_lists_every_message_of_the_code_and_pages():
    template = {m.id for m in read_template() if m.id}
    assert template == extracted(), "run `make messages` and translate what is new"


@pytest.mark.parametrize("language", TRANSLATED)
def test_every_message_is_translated_with_its_placeholders_and_markup(language):
    catalogue = read_catalogue(language)
    template = read_template()
    assert i18n.untranslated(catalogue, template) == []
    assert {m.id for m in catalogue if m.id} == {m.id for m in template if m.id}, "stale entries"
    # Babel's own checkers: python-format placeholders agree with the msgid.
    problems = [(m.id, errors) for m, errors in catalogue.check() if errors]
    assert problems == []
    for message in catalogue:
        if not message.id:
            continue
        assert sorted(PLACEHOLDER.findall(message.string)) == sorted(
            PLACEHOLDER.findall(message.id)
        ), message.id
        for tag in ("<strong>", "</strong>"):
            assert message.string.count(tag) == message.id.count(tag), message.id
        assert message.string != message.id, f"{message.id!r} is not translated"


@pytest.mark.parametrize("language", TRANSLATED)
def test_each_catalogue_says_a_native_speaker_must_review_it(language):
    path = ROOT / "probe_server" / "locale" / language / "LC_MESSAGES" / "messages.po"
    head = path.read_text(encoding="utf-8")[:600]
    assert "NOT YET REVIEWED" in head and "native speaker" in head


def visits(language: str) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(preview=preview, assignment_id=assignment, language=language)
        for preview, assignment in ((True, "ASSIGNMENT_ID_NOT_AVAILABLE"), (False, "A1"))
    ]


def every_page(pages: Pages, language: str) -> list[str]:
    """Each template of each kind, preview and not, the errors and the hand-off."""
    config = Config()
    tests = [(test, survey.field_names(test)) for test in config.speedtest.tests]
    common = {"token": "t" * 32, "red_urls": ["/red/x/1.png"], "blue_urls": ["/blue/x/1.png"]}
    rendered = []
    for visit in visits(language):
        rendered.append(pages.render(language, "survey.html", visit=visit, **common))
        rendered.append(
            pages.render(
                language,
                "speedtest.html",
                visit=visit,
                tests=tests,
                min_mbps="0.05",
                max_mbps="10000",
                **common,
            )
        )
        rendered.append(
            pages.render(language, "tool.html", visit=visit, tool=config.tool, **common)
        )
    rendered.append(pages.render(language, "error.html", message="x"))
    rendered.append(pages.render(language, "thanks.html"))
    rendered.append(pages.render(language, "repeat.html"))
    rendered.append(
        pages.render(
            language, "handoff.html", submit_url="https://x", assignment_id="A1", fields=[]
        )
    )
    return rendered


def worker_messages() -> list[Message]:
    """The errors and review feedback shown to workers, with values for their placeholders."""
    values = {"name": "hitId", "test": "Ookla", "max": 99, "hosts": "a.b", "tool": "T"}
    values.update(example="123", shown=3, reported=2, min="0.05")
    found = []
    for text in extracted():
        names = re.findall(r"%\(([a-z_]+)\)", text)
        found.append(Message(text, {name: values[name] for name in names}))
    return found


@pytest.mark.parametrize("language", SHIPPED)
def test_every_page_and_message_renders_in_every_language(language, caplog):
    caplog.set_level(logging.WARNING, logger="probe_server.i18n")
    pages = Pages()
    for html in every_page(pages, language):
        assert f'<html lang="{language}" dir="ltr">' in html
        assert "%(" not in html  # every placeholder filled
    for message in worker_messages():
        assert "%(" not in pages.message(language, message)
    # Not one lookup fell back to English: every message has its translation.
    assert pages.missing() == {lang: set() for lang in TRANSLATED}
    assert not [r for r in caplog.records if "untranslated" in r.getMessage()]


def test_pages_are_in_their_language():
    pages = Pages()
    visit = visits("ja")[1]
    common = {"token": "t" * 32, "red_urls": [], "blue_urls": []}
    assert "ボールを数えてください" in pages.render("ja", "survey.html", visit=visit, **common)
    assert "Topları sayın" in pages.render("tr", "survey.html", visit=visit, **common)
    assert "गेंदें गिनिए" in pages.render("hi", "survey.html", visit=visit, **common)
    english = pages.render("en", "survey.html", visit=visit, **common)
    assert "Count the balls" in english
    # Translations carry markup; values put into them are escaped.
    assert "<strong>赤い</strong>" in pages.render("ja", "survey.html", visit=visit, **common)
    error = Message("Please paste the report id that %(tool)s showed.", {"tool": "<b>x</b>"})
    rendered = pages.render("ja", "error.html", message=pages.message("ja", error))
    assert "<b>x</b>" not in rendered and "&lt;b&gt;x&lt;/b&gt;" in rendered


def test_a_missing_translation_is_reported_not_silent(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="probe_server.i18n")
    original = i18n.read_catalogue

    def without_submit(language: str):
        catalogue = original(language)
        catalogue.delete("Submit")
        return catalogue

    monkeypatch.setattr(i18n, "read_catalogue", without_submit)
    pages = Pages(["en", "tr"])
    assert any("catalogue_incomplete language=tr" in r.getMessage() for r in caplog.records)
    html = pages.render(
        "tr", "survey.html", visit=visits("tr")[1], token="t", red_urls=[], blue_urls=[]
    )
    assert ">Submit</button>" in html  # shown in English ...
    assert pages.missing() == {"tr": {"Submit"}}  # ... and reported
    assert any("message_untranslated language=tr" in r.getMessage() for r in caplog.records)


def test_fuzzy_translations_count_as_missing(monkeypatch):
    original = i18n.read_catalogue

    def fuzzy(language: str):
        catalogue = original(language)
        catalogue["Submit"].flags.add("fuzzy")
        return catalogue

    monkeypatch.setattr(i18n, "read_catalogue", fuzzy)
    assert i18n.untranslated(fuzzy("ja"), read_template()) == ["Submit"]
    pages = Pages(["ja"])
    pages.render("ja", "thanks.html")
    assert pages.translations["ja"].gettext("Submit") == "Submit"
    assert pages.missing() == {"ja": {"Submit"}}

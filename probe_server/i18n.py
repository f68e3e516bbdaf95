"""The survey's words in several languages: gettext catalogues, read with Babel.

English is the source language: every message is written in English in the
templates and the code, and ``probe_server/locale/messages.pot`` lists them
all (``make messages`` extracts it again and merges new messages into each
language's ``.po``). Each other language has its catalogue,
``locale/LANG/LC_MESSAGES/messages.po``, committed as text.

The catalogues are read at start with Babel's .po reader and turned into
gettext translations in memory with its .mo writer, so a fresh clone needs
no compile step and no generated file is kept in git. A message a catalogue
lacks is shown in English, as gettext does, but never silently: a catalogue
that misses messages of the template is logged at start, and every lookup
of a missing message is logged once and counted (tests fail on any).

Pages are rendered by one jinja2 environment per language, each with
jinja2's i18n extension bound to that language's translations.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import jinja2
from babel import Locale
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations

log = logging.getLogger(__name__)

SOURCE_LANGUAGE = "en"
DOMAIN = "messages"


def N_(message: str) -> str:
    """Mark a message for extraction; it is translated where it is shown."""
    return message


def locale_dir() -> Traversable:
    return resources.files("probe_server") / "locale"


def languages() -> tuple[str, ...]:
    """English and every language with a catalogue, English first."""
    found = sorted(
        entry.name
        for entry in locale_dir().iterdir()
        if entry.is_dir() and (entry / "LC_MESSAGES" / f"{DOMAIN}.po").is_file()
    )
    return (SOURCE_LANGUAGE, *(name for name in found if name != SOURCE_LANGUAGE))


def read_catalogue(language: str) -> Catalog:
    path = locale_dir() / language / "LC_MESSAGES" / f"{DOMAIN}.po"
    with path.open("rb") as f:
        return read_po(f, locale=language, domain=DOMAIN)


def read_template() -> Catalog:
    """The message template: every message the survey shows, in English."""
    with (locale_dir() / f"{DOMAIN}.pot").open("rb") as f:
        return read_po(f, domain=DOMAIN)


def untranslated(catalogue: Catalog, template: Catalog) -> list[str]:
    """Messages of the template that the catalogue lacks, leaves empty or marks fuzzy."""
    missing = []
    for message in template:
        if not message.id:
            continue
        found = catalogue.get(message.id)
        strings = found.string if found is not None else None
        empty = not all(strings) if isinstance(strings, tuple | list) else not strings
        if found is None or empty or found.fuzzy:
            missing.append(message.id if isinstance(message.id, str) else message.id[0])
    return missing


class ReportingTranslations(Translations):
    """gettext translations that log and count each message they lack."""

    def __init__(self, fp: Any, language: str) -> None:
        super().__init__(fp=fp, domain=DOMAIN)
        self.language = language
        self.missing: set[str] = set()

    def _miss(self, message: str) -> None:
        if message not in self.missing:
            self.missing.add(message)
            log.warning(
                "event=message_untranslated language=%s message=%r (shown in English)",
                self.language,
                message,
            )

    def gettext(self, message: str) -> str:
        if message not in self._catalog:
            self._miss(message)
        result: str = super().gettext(message)
        return result

    def ngettext(self, msgid1: str, msgid2: str, n: int) -> str:
        if (msgid1, 0) not in self._catalog:
            self._miss(msgid1)
        result: str = super().ngettext(msgid1, msgid2, n)
        return result

    # jinja2 prefers the u- names, which Babel binds to the plain gettext
    # methods of its base class: point them at the reporting ones.
    ugettext = gettext
    ungettext = ngettext


def load_translations(language: str) -> NullTranslations:
    """The language's translations (English: the messages as written)."""
    if language == SOURCE_LANGUAGE:
        return NullTranslations()
    catalogue = read_catalogue(language)
    missing = untranslated(catalogue, read_template())
    if missing:
        log.warning(
            "event=catalogue_incomplete language=%s untranslated=%d first=%r",
            language,
            len(missing),
            missing[0],
        )
    buffer = io.BytesIO()
    # Fuzzy entries are a translator's guesses: left out, so they show up as missing.
    write_mo(buffer, catalogue, use_fuzzy=False)
    buffer.seek(0)
    return ReportingTranslations(buffer, language)


def direction(language: str) -> str:
    """``ltr`` or ``rtl``, from CLDR's character order for the language."""
    return "rtl" if Locale.parse(language).character_order == "right-to-left" else "ltr"


@dataclass(frozen=True)
class Message:
    """A message to show a worker: its English text and the values it names."""

    text: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def render(self, translations: NullTranslations) -> str:
        translated: str = translations.gettext(self.text)
        return translated % dict(self.params) if self.params else translated


class Pages:
    """One jinja2 environment per language, each with its translations."""

    def __init__(self, langs: Iterable[str] | None = None) -> None:
        self.translations: dict[str, NullTranslations] = {}
        self.environments: dict[str, jinja2.Environment] = {}
        for language in langs if langs is not None else languages():
            translations = load_translations(language)
            env = jinja2.Environment(
                loader=jinja2.PackageLoader("probe_server", "templates"),
                autoescape=True,
                undefined=jinja2.StrictUndefined,
                extensions=["jinja2.ext.i18n"],
            )
            # newstyle: placeholders are %(name)s, filled in and escaped by jinja2.
            env.install_gettext_translations(translations, newstyle=True)  # type: ignore[attr-defined]
            env.globals["lang"] = language
            env.globals["direction"] = direction(language)
            self.translations[language] = translations
            self.environments[language] = env

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.environments)

    def render(self, language: str, template: str, **context: Any) -> str:
        return self.environments[language].get_template(template).render(**context)

    def message(self, language: str, message: Message) -> str:
        return message.render(self.translations[language])

    def missing(self) -> dict[str, set[str]]:
        """Messages looked up but not found, by language, since start."""
        return {
            language: set(t.missing)
            for language, t in self.translations.items()
            if isinstance(t, ReportingTranslations)
        }

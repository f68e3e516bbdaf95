"""MTurk's XML: the ExternalQuestion we send, the QuestionFormAnswers we get back.

Answers carry workers' free text, so they are parsed with defusedxml (no
entity expansion, no external fetches). Elements are matched by local name:
MTurk has used more than one schema version in the namespace over the years.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from xml.etree.ElementTree import Element, SubElement, tostring

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeElementTree

EXTERNAL_QUESTION_NS = "http://mechanicalturk.amazonaws.com/AWSMechanicalTurkDataSchemas/2006-07-14/ExternalQuestion.xsd"
ANSWERS_NS = (
    "http://mechanicalturk.amazonaws.com/AWSMechanicalTurkDataSchemas/2005-10-01/"
    "QuestionFormAnswers.xsd"
)


class BadXML(ValueError):
    """The XML is not what MTurk sends or accepts; the message says why."""


def external_question(url: str, frame_height: int) -> str:
    """The ExternalQuestion XML for CreateHIT's Question (``&`` becomes ``&amp;``)."""
    root = Element("ExternalQuestion", xmlns=EXTERNAL_QUESTION_NS)
    SubElement(root, "ExternalURL").text = url
    SubElement(root, "FrameHeight").text = str(frame_height)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + tostring(root, encoding="unicode")


@dataclass(frozen=True, slots=True)
class ExternalQuestion:
    url: str
    frame_height: int


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse(text: str) -> Element:
    try:
        root: Element = SafeElementTree.fromstring(text)
    except DefusedXmlException as e:
        # MTurk's own answers declare no entities: this one was made by hand.
        raise BadXML(f"refused XML with a DTD or entity declaration: {e!r}") from None
    except Exception as e:  # ElementTree's ParseError and, for odd input, others
        raise BadXML(f"not well-formed XML: {e}") from None
    return root


def parse_external_question(text: str) -> ExternalQuestion:
    root = _parse(text)
    if root.tag != f"{{{EXTERNAL_QUESTION_NS}}}ExternalQuestion":
        raise BadXML("the root element is not an ExternalQuestion in MTurk's namespace")
    children = {_local(child.tag): (child.text or "").strip() for child in root}
    url = children.get("ExternalURL", "")
    height = children.get("FrameHeight", "")
    if not url:
        raise BadXML("ExternalURL is missing")
    if not height.isdigit():
        raise BadXML("FrameHeight must be a whole number of pixels")
    return ExternalQuestion(url=url, frame_height=int(height))


def question_form_answers(fields: Iterable[tuple[str, str]]) -> str:
    """What MTurk stores for an externalSubmit: one FreeText answer per form field."""
    root = Element("QuestionFormAnswers", xmlns=ANSWERS_NS)
    for name, value in fields:
        answer = SubElement(root, "Answer")
        SubElement(answer, "QuestionIdentifier").text = name
        SubElement(answer, "FreeText").text = value
    # MTurk's answers are ASCII, with character references for the rest.
    return tostring(root, encoding="us-ascii", xml_declaration=True).decode("ascii")


def parse_answers(text: str) -> dict[str, str]:
    """QuestionIdentifier -> answer text from a QuestionFormAnswers document.

    A FreeText answer is taken as is; selection answers are joined with
    ``|``. A field submitted twice keeps its last value, as a form would.
    """
    root = _parse(text)
    if _local(root.tag) != "QuestionFormAnswers":
        raise BadXML("the root element is not QuestionFormAnswers")
    answers: dict[str, str] = {}
    for answer in root:
        if _local(answer.tag) != "Answer":
            continue
        name = None
        values: list[str] = []
        for part in answer:
            kind = _local(part.tag)
            if kind == "QuestionIdentifier":
                name = (part.text or "").strip()
            elif kind in ("FreeText", "SelectionIdentifier", "OtherSelectionText"):
                values.append(part.text or "")
        if name:
            answers[name] = "|".join(values)
    return answers

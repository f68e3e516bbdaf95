"""MTurk's Answer text as MTurk writes it, and as nobody should trust it.

The samples are written by hand, in the shape of MTurk's QuestionFormAnswers
(an XML declaration, the 2005-10-01 namespace, one Answer per form field,
character references for what is not ASCII), not produced by our own
serializer; the fake hands them to sync verbatim (``/_fake/submit-answer``).
"""

from __future__ import annotations

import pytest

from probe_server.mturk.questions import BadXML, parse_answers

from .test_repeat_workers import accept, experiment, open_task, publish
from .test_requester import cli, rows
from .test_web import Page

# What list_assignments_for_hit returns for an ExternalQuestion HIT whose
# form sent token, red, blue and a free-text comment. {token} and {red} are
# filled in per test.
MTURK_ANSWER = """\
<?xml version="1.0" encoding="ASCII"?>
<QuestionFormAnswers xmlns="http://mechanicalturk.amazonaws.com/AWSMechanicalTurkDataSchemas/2005-10-01/QuestionFormAnswers.xsd">
  <Answer>
    <QuestionIdentifier>token</QuestionIdentifier>
    <FreeText>{token}</FreeText>
  </Answer>
  <Answer>
    <QuestionIdentifier>red</QuestionIdentifier>
    <FreeText>{red}</FreeText>
  </Answer>
  <Answer>
    <QuestionIdentifier>blue</QuestionIdentifier>
    <FreeText>0</FreeText>
  </Answer>
  <Answer>
    <QuestionIdentifier>comment</QuestionIdentifier>
    <FreeText>Fast &amp; easy &#8212; &#231;ok g&#252;zel</FreeText>
  </Answer>
</QuestionFormAnswers>
"""

BILLION_LAUGHS = """\
<?xml version="1.0" encoding="ASCII"?>
<!DOCTYPE QuestionFormAnswers [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<QuestionFormAnswers xmlns="http://mechanicalturk.amazonaws.com/AWSMechanicalTurkDataSchemas/2005-10-01/QuestionFormAnswers.xsd">
  <Answer>
    <QuestionIdentifier>red</QuestionIdentifier>
    <FreeText>&lol9;</FreeText>
  </Answer>
</QuestionFormAnswers>
"""

EXTERNAL_ENTITY = """\
<?xml version="1.0"?>
<!DOCTYPE QuestionFormAnswers [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<QuestionFormAnswers xmlns="http://mechanicalturk.amazonaws.com/AWSMechanicalTurkDataSchemas/2005-10-01/QuestionFormAnswers.xsd">
  <Answer><QuestionIdentifier>red</QuestionIdentifier><FreeText>&secret;</FreeText></Answer>
</QuestionFormAnswers>
"""


def test_an_answer_as_mturk_writes_it_is_read():
    answers = parse_answers(MTURK_ANSWER.format(token="abc", red="3"))
    assert answers == {
        "token": "abc",
        "red": "3",
        "blue": "0",
        "comment": "Fast & easy \u2014 \u00e7ok g\u00fczel",
    }


@pytest.mark.parametrize("text", [BILLION_LAUGHS, EXTERNAL_ENTITY, "<QuestionFormAnswers><Ans"])
def test_hostile_or_broken_answers_are_refused_not_expanded(text):
    with pytest.raises(BadXML):
        parse_answers(text)


async def submit_answer(http, fake_mturk, assignment_id: str, answer: str) -> None:
    async with http.post(
        f"{fake_mturk.url}/_fake/submit-answer",
        json={"assignmentId": assignment_id, "answer": answer},
    ) as response:
        assert response.status == 200, await response.text()


async def test_sync_keeps_what_it_could_not_read_and_review_leaves_it_for_a_person(
    tmp_path, turk_server, fake_mturk, http
):
    path = experiment(tmp_path, turk_server, 'name = "b"\nreward = "0.05"\nassignments = 4')
    (hit_id,) = (await publish(path, fake_mturk))["b"]
    readable = await accept(http, fake_mturk, hit_id, "AREADABLE")
    page = Page(await open_task(http, readable["url"]))
    await submit_answer(
        http,
        fake_mturk,
        readable["assignmentId"],
        MTURK_ANSWER.format(token=page.token, red=len(page.red)),
    )
    hostile = {}
    for worker, text in (("ALAUGHS", BILLION_LAUGHS), ("AENTITY", EXTERNAL_ENTITY)):
        assignment = await accept(http, fake_mturk, hit_id, worker)
        Page(await open_task(http, assignment["url"]))
        await submit_answer(http, fake_mturk, assignment["assignmentId"], text)
        hostile[assignment["assignmentId"]] = worker
    endpoint = ("--endpoint-url", fake_mturk.url)
    status, out, err = await cli("hits", "sync", str(path), *endpoint)
    assert status == 0 and "Synced 3 assignments" in out, out + err
    stored = {
        a: (answers, error)
        for a, answers, error in rows(
            tmp_path, "SELECT assignment_id, answers, answer_error FROM assignments"
        )
    }
    assert stored[readable["assignmentId"]][1] is None
    for assignment_id in hostile:
        answers, error = stored[assignment_id]
        assert answers == "{}" and error and "refused XML with a DTD or entity declaration" in error
        assert "lol" * 10 not in error

    status, out, _ = await cli("hits", "review", str(path), *endpoint)
    assert status == 0 and "Approved 1, rejected 0, left 2 for you to decide" in out, out
    assert fake_mturk.fake.assignments[readable["assignmentId"]].status == "Approved"
    for assignment_id, worker in hostile.items():
        assert fake_mturk.fake.assignments[assignment_id].status == "Submitted"
        (line,) = [line for line in out.splitlines() if assignment_id in line]
        assert line.startswith("skip") and f"worker {worker}" in line
        assert "MTurk's answer could not be read" in line
    assert rows(tmp_path, "SELECT count(*) FROM reviews") == [(1,)]

"""Evidence readers inside policies, on the scripted model: the SQL table reader (exact calls,
the evidence the model is shown, the fallback to the rows) and the image-entity shortcut."""

from __future__ import annotations

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.policies.baselines import make_policy
from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
from kbrouter.types import Evidence, Modality, Table

QUESTION = "How many times did Team A win the cup?"
HEADER = ["Year", "Winner"]
BLOCKS = [  # one table indexed as two row blocks; Team A won three times in all
    [["1990", "Team A"], ["1991", "Team B"]],
    [["1992", "Team A"], ["1993", "Team A"]],
]


def _cup_table(blocks: list[list[list[str]]]) -> StaticKB:
    """A table KB holding the cup table "tbl-cup" as the given row blocks."""
    evidence = [
        Evidence(
            kb="table",
            id=f"tbl-cup#{i}",
            score=0.0,
            text="Cup winners Team A " + " ".join(" ".join(r) for r in rows),
            title="Cup winners",
            modality=Modality.TABLE,
            table=Table(header=HEADER, rows=rows, title="Cup winners"),
            metadata={"doc_id": "tbl-cup"},
        )
        for i, rows in enumerate(blocks)
    ]
    return StaticKB("table", evidence, modality=Modality.TABLE)


def _kbs() -> list[StaticKB]:
    text = Evidence(kb="text", id="p1", score=0.0, text="Team A is a football club.")
    return [StaticKB("text", [text]), _cup_table(BLOCKS)]


def _run(method: str, outputs: list[str], **options):
    model = ScriptedChatModel(outputs)
    policy = make_policy(method, **options)
    engine = Engine(model, StaticKBRegistry(_kbs()), policy, EngineConfig(top_k=1))
    return engine.answer_sync(QUESTION)


SQL = "<sql>SELECT COUNT(*) AS wins FROM t WHERE \"Winner\" = 'Team A'</sql>"


def test_single_kb_sql_reader_counts_over_the_whole_table():
    traj = _run(
        "single-kb:table",
        [SQL, "<answer>3</answer>"],
        table_reader="sql",
        sql_reader={"answer_single_value": False},
    )
    assert [c.purpose for c in traj.model_calls()] == ["read", "final"]
    read = traj.steps[0].read_calls[0]
    assert 'Table t ("Cup winners"): 4 rows' in read.messages[-1].text()  # both blocks
    final_prompt = traj.final_call.messages[-1].text()
    assert "Result of the SQL query SELECT COUNT(*) AS wins" in final_prompt
    assert "Result: 3" in final_prompt and "wins\n3" not in final_prompt  # a value, no header
    assert "1993 | Team A" not in final_prompt  # the shown rows are replaced by the result
    assert any("table reader: SQL" in n and "-> 1 row(s)" in n for n in traj.steps[0].notes)
    assert traj.answer == "3"


def test_a_reply_without_sql_or_a_failing_query_falls_back_to_the_rows():
    for reply, why in [
        ("I cannot write that.", "no SQL query"),
        ("<sql>SELECT * FROM read_csv('/etc/passwd')</sql>", "disabled"),
        ('<sql>SELECT "Winner" FROM t WHERE "Year" > 2000</sql>', "returned nothing"),
    ]:
        traj = _run(
            "single-kb:table",
            [reply, "<answer>1</answer>"],
            table_reader="sql",
            sql_reader={"retries": 0},
        )
        note = next(n for n in traj.steps[0].notes if n.startswith("table reader:"))
        assert why in note and note.endswith("reading the rows instead")
        final_prompt = traj.final_call.messages[-1].text()
        assert "1993 | Team A" in final_prompt and "Result of the SQL" not in final_prompt


def test_a_one_value_result_is_the_answer_without_a_model_call():
    """single-kb: the count is the answer (noted); all-kbs also shows a passage, so the model
    reads the result with it."""
    traj = _run("single-kb:table", [SQL], table_reader="sql")
    assert [c.purpose for c in traj.model_calls()] == ["read"]
    assert traj.answer == "3" and traj.final_call is None and traj.stop_reason == "answered"
    assert any("one value, '3'; it is the answer" in n for n in traj.steps[0].notes)
    both = _run("all-kbs", [SQL, "<answer>3</answer>"], table_reader="sql")
    assert [c.purpose for c in both.model_calls()] == ["read", "final"]
    final_prompt = both.final_call.messages[-1].text()
    assert "Result: 3" in final_prompt and "Team A is a football club." in final_prompt
    assert not any("one value" in n for n in both.steps[0].notes)


def test_a_failed_query_is_corrected_once_with_the_error():
    bad = "<sql>SELECT COUNT(*) FROM t WHERE Champion = 'Team A'</sql>"
    traj = _run(
        "single-kb:table",
        [bad, SQL, "<answer>3</answer>"],
        table_reader="sql",
        sql_reader={"answer_single_value": False},
    )
    assert [c.purpose for c in traj.model_calls()] == ["read", "read", "final"]
    retry = traj.steps[0].read_calls[1].messages
    assert retry[-2].content == bad and "That query failed" in retry[-1].text()
    assert "Binder Error" in retry[-1].text() and "Champion" in retry[-1].text()
    # the retry lists the table's real columns
    assert 'using only these columns, in double quotes: t: "Year", "Winner"' in retry[-1].text()
    notes = [n for n in traj.steps[0].notes if n.startswith("table reader:")]
    assert "asking for a corrected query" in notes[0] and "-> 1 row(s)" in notes[1]
    assert "Result: 3" in traj.final_call.messages[-1].text()


def test_a_total_row_is_left_out_and_a_repaired_query_is_noted():
    """The table's last block ends with a "Total" row: the query counts the data rows only.
    The 0.5B names the table by its title: the query runs on t, and the notes say both."""
    blocks = [[["1990", "Team A"], ["1991", "Team B"]], [["1992", "Team A"], ["Total", "3"]]]
    kbs = StaticKBRegistry([_cup_table(blocks)])
    policy = make_policy("single-kb:table", table_reader="sql")
    model = ScriptedChatModel(["<sql>SELECT COUNT(*) FROM Cup_winners</sql>"])
    traj = Engine(model, kbs, policy, EngineConfig(top_k=1)).answer_sync(QUESTION)
    assert 'Table t ("Cup winners"): 3 rows' in traj.steps[0].read_calls[0].messages[-1].text()
    notes = [n for n in traj.steps[0].notes if n.startswith("table reader:")]
    assert notes[0] == "table reader: the last row of t (Total | 3) left out"
    assert "SELECT COUNT(*) FROM t AS Cup_winners" in notes[1]
    assert "query rewritten: Cup_winners -> t" in notes[1]
    assert traj.answer == "3"


def test_sql_reader_is_the_default_and_rows_make_no_extra_call():
    traj = _run("single-kb:table", [SQL])
    assert [c.purpose for c in traj.model_calls()] == ["read"]  # a one-value result answers
    assert traj.config["table_reader"] == "sql"
    traj = _run("single-kb:table", ["<answer>1</answer>"], table_reader="rows")
    assert [c.purpose for c in traj.model_calls()] == ["final"]
    assert traj.config["table_reader"] == "rows"


def test_r1_router_loop_reads_tables_by_sql_before_the_sub_answer():
    outputs = [
        "<think>t</think><sub-question>How many times did Team A win?</sub-question>"
        "<ret>table</ret>",
        SQL,
        "<answer>3</answer>",
        "<think>done</think><sub-question>None</sub-question><ret>None</ret>",
        "<answer>3</answer>",
    ]
    traj = _run(
        "r1-router",
        outputs,
        table_reader="sql",
        use_grammar=False,
        sql_reader={"answer_single_value": False},
    )
    assert [c.purpose for c in traj.model_calls()] == [
        "route",
        "read",
        "sub_answer",
        "route",
        "final",
    ]
    sub_prompt = traj.steps[0].answer_call.messages[-1].text()
    assert "Result: 3" in sub_prompt
    assert traj.answer == "3" and traj.config["table_reader"] == "sql"
    # by default the one-value result is the sub-answer: no sub-answer call
    outputs.remove("<answer>3</answer>")
    traj = _run("r1-router", outputs, table_reader="sql", use_grammar=False)
    assert [c.purpose for c in traj.model_calls()] == ["route", "read", "route", "final"]
    assert traj.steps[0].sub_answer == "3" and traj.steps[0].answer_call is None
    assert any("answers the sub-question without a model call" in n for n in traj.steps[0].notes)
    assert "Answer 1: 3" in traj.final_call.messages[-1].text()
    assert traj.answer == "3"


def _image_kbs(pinned: bool) -> list[StaticKB]:
    meta = {"pinned": True} if pinned else {}
    flags = [
        Evidence(
            kb="image",
            id="img-flag-au",
            score=0.95,
            text="Flag of Australia. Australia is a country in Oceania.",
            title="Flag of Australia",
            modality=Modality.IMAGE,
            metadata=meta,
        ),
        Evidence(
            kb="image",
            id="img-flag-ke",
            score=0.05,
            text="Flag of Kenya. Kenya is a country in Eastern Africa.",
            title="Flag of Kenya",
            modality=Modality.IMAGE,
        ),
    ]
    return [*_kbs(), StaticKB("image", flags, modality=Modality.IMAGE)]


def _flag_run(
    tmp_path,
    sub_question: str,
    outputs_after: list[str],
    pinned: bool = True,
    question: str = "Which country's flag is shown?",
    **options,
):
    img = tmp_path / "q.jpg"
    img.write_bytes(b"static KBs do not read it")
    outputs = [
        f"<think>t</think><sub-question>{sub_question}</sub-question><ret>image</ret>",
        *outputs_after,
    ]
    model = ScriptedChatModel(outputs)
    options = {"image_entity": True, "use_grammar": False, **options}
    policy = make_policy("r1-router", **options)
    engine = Engine(model, StaticKBRegistry(_image_kbs(pinned)), policy, EngineConfig(top_k=2))
    from kbrouter.types import Question

    return engine.answer_sync(Question(text=question, image=img))


STOP = "<think>done</think><sub-question>None</sub-question><ret>None</ret>"


def test_image_match_answers_an_identification_sub_question_without_a_model_call(tmp_path):
    traj = _flag_run(
        tmp_path,
        "Which country's flag is shown in the image?",
        [STOP, "<answer>Australia</answer>"],
    )
    assert [c.purpose for c in traj.model_calls()] == ["route", "route", "final"]
    assert traj.steps[0].sub_answer == "Flag of Australia" and traj.steps[0].answer_call is None
    assert any(
        "image-to-image match" in n and "Flag of Australia; answered without a model call" in n
        for n in traj.steps[0].notes
    )
    assert "Answer 1: Flag of Australia" in traj.final_call.messages[-1].text()


def test_no_shortcut_for_other_questions_or_without_a_match(tmp_path):
    # asks about the item, not what it is: the model reads the evidence
    traj = _flag_run(
        tmp_path,
        "What is the flag shown in the image made of?",
        ["<answer>cloth</answer>", STOP, "<answer>cloth</answer>"],
        identify_first=False,
    )
    assert [c.purpose for c in traj.model_calls()] == ["route", "sub_answer", "route", "final"]
    # no image-to-image match above the threshold: no shortcut either
    traj = _flag_run(
        tmp_path,
        "Which country's flag is shown?",
        ["<answer>Kenya</answer>", STOP, "<answer>Kenya</answer>"],
        pinned=False,
        answer_from_question_hop=False,
    )
    assert [c.purpose for c in traj.model_calls()] == ["route", "sub_answer", "route", "final"]


def test_pinned_alone_shows_only_the_image_match(tmp_path):
    outputs = [
        "<answer>Australia</answer>",
        STOP,
        "<answer>Australia</answer>",
    ]
    for alone, shown in [(True, ["Flag of Australia"]), (False, ["Flag of Australia", "Kenya"])]:
        img = tmp_path / "q.jpg"
        img.write_bytes(b"x")
        route = "<think>t</think><sub-question>Which country's flag?</sub-question><ret>image</ret>"
        model = ScriptedChatModel([route, *outputs])
        # the relevance margin (on by default) also lets a pinned match stand alone: off here
        policy = make_policy(
            "r1-router",
            pinned_alone=alone,
            image_entity=False,
            use_grammar=False,
            relevance_margin=None,
        )
        engine = Engine(model, StaticKBRegistry(_image_kbs(True)), policy, EngineConfig(top_k=2))
        from kbrouter.types import Question

        traj = engine.answer_sync(Question(text="Which country's flag is this?", image=img))
        prompt = traj.steps[0].answer_call.messages[-1].text()
        assert all(s in prompt for s in shown)
        assert ("Flag of Kenya" in prompt) is (not alone)


def test_omnisearch_and_cogplanner_read_retrieved_tables_with_sql():
    """The agentic methods' retrieved tables go through the same SQL reader as the others."""
    omni = [
        "<Thought>\nsearch\n<Sub-Question>\nHow many cups did Team A win?\n<Search>\n"
        "Text Retrieval: Team A cup wins",
        SQL,  # the reader answers the sub-question from the table
        "<answer>3</answer>",  # the solver reads the SQL result
        "<Thought>\ndone\n<End>\nFinal Answer: 3",
    ]
    traj = _run("omnisearch", omni, table_reader="sql")
    assert [c.purpose for c in traj.model_calls()] == ["route", "read", "sub_answer", "route"]
    read = traj.steps[0].read_calls[0].messages[-1].text()
    assert "How many cups did Team A win?" in read
    assert "Result: 3" in traj.steps[0].answer_call.messages[-1].text()
    assert traj.answer == "3"

    cog = [
        "<reformulate>no</reformulate>",
        "<retrieval>text</retrieval>",
        SQL,
        "<reformulate>no</reformulate>",
        "<retrieval>none</retrieval>",
        "<answer>3</answer>",
    ]
    traj = _run("cogplanner", cog, table_reader="sql")
    purposes = [c.purpose for c in traj.model_calls()]
    assert purposes == ["route", "route", "read", "route", "route", "final"]
    assert "Result: 3" in traj.final_call.messages[-1].text()
    assert traj.answer == "3"

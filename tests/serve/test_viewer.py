"""The trace viewer end to end in headless Chromium (Debian's ``chromium``, driven by
Playwright): load the page, ask a demo question with an image upload and two methods side by
side, watch the steps and answers render, then open an evaluation results directory and browse
its trajectories. Screenshots go to the test's temp folder (artefacts, not committed)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from kbrouter.serve.app import ServeConfig, create_app
from kbrouter.testing import LiveServer, ScriptedChatModel, demo_registry
from kbrouter.types import ChatMessage

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)


def reply(messages: list[ChatMessage]) -> str:
    """Route the first hop to the image KB (text KB without an image), then stop."""
    system, last = messages[0].text(), messages[-1].text()
    if "<ret>" in system:
        if "Answer 1:" in last:
            return "<think>done</think><sub-question>None</sub-question><ret>None</ret>"
        kb = "images" if "image is attached" in last else "text"
        sub = "Which country's flag is shown?" if kb == "images" else "Which city is the capital?"
        return f"<think>first</think><sub-question>{sub}</sub-question><ret>{kb}</ret>"
    return "<answer>Canberra</answer>"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    from kbrouter.engine.engine import EngineConfig
    from kbrouter.eval.harness import run_eval

    tmp = tmp_path_factory.mktemp("viewer")
    registry = demo_registry(tmp / "index")
    results = tmp / "demo-eval"
    run_eval(
        f"jsonl:{DEMO / 'questions.jsonl'}",
        "r1-router",
        EngineConfig(max_steps=3, top_k=3),
        "scripted",
        results,
        model=ScriptedChatModel(reply),
        registry=registry,
        progress=False,
        image_dir=DEMO,
    )
    config = ServeConfig(methods=["r1-router", "all-kbs"], results_dirs=[str(results)])
    app = create_app(ScriptedChatModel(reply), registry, config)
    with LiveServer(app) as server:
        yield server, tmp
    registry.close()


def test_ask_compare_and_browse_results_in_chromium(served):
    from playwright.sync_api import expect, sync_playwright

    server, tmp = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        expect(page.locator("#status")).to_have_text("ready")
        assert page.locator("#method option").all_inner_texts() == ["r1-router", "all-kbs"]

        # ask with an image upload and a second method, from the keyboard
        question = "In which city is the national capital of the country whose flag is shown?"
        page.fill("#question", question)
        page.set_input_files("#image", str(DEMO / "questions" / "flag.jpg"))
        page.select_option("#method2", "all-kbs")
        page.focus("#question")
        page.keyboard.press("Control+Enter")
        answers = page.locator("[data-testid=answer]")
        expect(answers).to_have_count(2, timeout=60_000)
        expect(answers.first).to_have_text("Canberra")
        r1 = page.locator(".run[data-method=r1-router]")
        # steps, the chosen KB with its description and who chose it, evidence by modality
        expect(r1.locator(".step").first).to_contain_text("step 1")
        expect(r1.locator(".kb").first).to_have_text("images")
        expect(r1.locator(".who").first).to_have_text("decided by: llm")
        thumb = r1.locator(".evidence li[data-modality=image] img").first
        expect(thumb).to_be_visible()
        assert page.evaluate("(img) => img.naturalWidth > 0", thumb.element_handle())
        expect(r1.locator(".meta", has_text="tokens").first).to_be_visible()
        all_kbs = page.locator(".run[data-method=all-kbs]")
        expect(all_kbs.locator(".evidence li[data-modality=table] table").first).to_be_visible()
        page.screenshot(path=str(tmp / "viewer-ask.png"), full_page=True)

        # the results browser: list, filter, open a trajectory (keyboard: Enter)
        page.click("#tab-results")
        items = page.locator("#results-list li")
        expect(items).to_have_count(8)
        expect(page.locator("#results-summary")).to_have_text("8 of 8 shown")
        page.select_option("#results-filter", "correct")
        correct = items.count()
        page.select_option("#results-filter", "incorrect")
        assert items.count() + correct == 8
        page.select_option("#results-filter", "all")
        page.select_option("#results-kb", "images")
        assert 0 < items.count() < 8
        items.first.focus()
        page.keyboard.press("Enter")
        detail = page.locator("#results-detail")
        expect(detail.locator("h2")).not_to_be_empty()
        expect(detail.locator(".step").first).to_be_visible()
        expect(detail.locator("[data-testid=answer]")).to_have_count(1)
        page.screenshot(path=str(tmp / "viewer-results.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert (tmp / "viewer-ask.png").stat().st_size > 0


def test_a_server_with_an_api_key_is_usable_from_the_viewer(tmp_path):
    """With --api-key-env the page asks for the key; once entered, every call sends it and
    image thumbnails (which an <img> could not authenticate) are fetched with it."""
    from playwright.sync_api import expect, sync_playwright

    registry = demo_registry(tmp_path / "index")
    app = create_app(
        ScriptedChatModel(reply), registry, ServeConfig(methods=["r1-router"], api_key="vk")
    )
    try:
        with LiveServer(app) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url + "/")
            expect(page.locator("#status")).to_contain_text("401")
            page.fill("#api-key", "vk")
            page.locator("#api-key").dispatch_event("change")
            expect(page.locator("#status")).to_have_text("ready")
            page.fill("#question", "Which country's flag is this?")
            page.set_input_files("#image", str(DEMO / "questions" / "flag.jpg"))
            page.click("#ask")
            expect(page.locator("[data-testid=answer]")).to_have_text("Canberra")
            thumb = page.locator(".evidence li[data-modality=image] img").first
            expect(thumb).to_have_attribute("src", re.compile(r"^blob:"))
            page.wait_for_function(
                "(img) => img.complete && img.naturalWidth > 0", arg=thumb.element_handle()
            )
            page.screenshot(path=str(tmp_path / "viewer-key.png"))
            browser.close()
    finally:
        registry.close()

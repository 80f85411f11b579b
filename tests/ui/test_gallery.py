"""The gallery (``/ui``) in a real Chromium, through Playwright, against ``sdfleet up``.

``fleet`` runs ``sdfleet up`` in its own process with two tenants (alice, bob), the diffusers
runtime and a tiny model; the browser is Debian's ``/usr/bin/chromium`` (``make system-deps``),
because Playwright's own browser download is not available here. Each test saves screenshots in
``test-results/<test>/`` for a person to look at. Playwright's async API, in the tests' own event
loop: its sync API keeps a loop running in the main thread for the whole session, which breaks
every asyncio test that runs after it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.async_api import Dialog, Page, Route, async_playwright, expect

from up_process import UpProcess, sdfleet_up

pytestmark = pytest.mark.timeout(600)  # a browser, a fleet process and a model on a shared CPU
expect.set_options(timeout=60_000)
ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
MODEL = "tiny-gallery"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


RETAIN_DAYS = 30
MAX_WIDTH = 1536


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    from sdfleet.models.tiny import make_tiny

    work = tmp_path_factory.mktemp("gallery")
    make_tiny(work / "models", MODEL)
    tenants = {
        hashlib.sha256(k.encode()).hexdigest(): {"name": n} for k, n in ((ALICE, "alice"), (BOB, "bob"))
    }
    fleet = {
        "queues": [{"name": "default"}],
        "models": {"dir": str(work / "models"), "default": MODEL},
        "retain_days": RETAIN_DAYS,
    }
    env = {
        "SDFLEET_AGENT__CANCEL_CHECK_S": "0.5",
        # a progress write every 0.2 s, not every second: the progress test's run (2.9 s here)
        # shows its bar moving on a host several times faster, where a run under a second wrote none
        "SDFLEET_AGENT__PROGRESS_EVERY_S": "0.2",
        "SDFLEET_AGENT__ALLOW_PRIVATE_INPUTS": "true",
        "SDFLEET_API__MAX_WIDTH": str(MAX_WIDTH),  # not the default: the form must read it
    }
    with sdfleet_up(work, {**fleet, "tenants": tenants}, env) as up:
        yield up


@pytest.fixture
def unavailable_input() -> Iterator[str]:
    """An input image URL on 127.0.0.1 that always answers 503 with ``Retry-After: 600``: a task
    that needs it waits queued, its last try failed, for ten minutes."""

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Retry-After", "600")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/input.png"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Path:
    """The test's output folder, ``test-results/<test>/``."""
    folder = Path("test-results") / re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def use_key(page: Page, key: str) -> None:
    await page.fill("#api-key", key)
    await page.click("#key-form button[type=submit]")
    await expect(page.locator("#key-state")).to_have_text("key set")


async def submit_from_form(page: Page, prompt: str, size: int, steps: int) -> None:
    await page.fill("textarea[name=prompt]", prompt)
    await page.fill("input[name=width]", str(size))
    await page.fill("input[name=height]", str(size))
    await page.fill("input[name=steps]", str(steps))
    await page.click("#submit-button")
    await expect(page.locator("#notice")).to_contain_text("Submitted")


async def progress_seen(
    page: Page, selector: str, state_selector: str, timeout_s: float = 300
) -> list[float]:
    """Values of a progress bar read while its task shows ``running``, until it is not running."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await page.locator(state_selector).text_content()
        if state == "running":
            seen.append(float(await page.locator(selector).evaluate("bar => bar.value")))
        elif state in ("succeeded", "failed", "cancelled"):
            return seen
        await page.wait_for_timeout(100)
    raise AssertionError(f"still not finished after {timeout_s} s; progress seen: {seen}")


async def test_submit_watch_progress_and_see_the_image(page: Page, fleet: UpProcess, shots: Path) -> None:
    await page.goto(f"{fleet.url}/")  # the API's address in a browser: the gallery (a JSON 404 before)
    await expect(page).to_have_url(f"{fleet.url}/ui")
    await expect(page.locator("#notice")).to_contain_text("API key")  # the fleet has tenants: keys needed
    await use_key(page, ALICE)
    await expect(page.locator("#model-choice option", has_text=MODEL)).to_have_count(1)
    # long enough for progress writes (every 0.2 s in this fleet, none for a run shorter than
    # that): 150 steps, the most a task may ask, at 128x128 take 2.9 s of the tiny model here
    await submit_from_form(page, "a red boat on a calm sea", size=128, steps=150)
    card = page.locator(".card").first
    seen = await progress_seen(page, ".card >> nth=0 >> progress", ".card >> nth=0 >> .state")
    assert any(0 < v < 1 for v in seen), seen  # the bar moved while it ran, live over SSE
    await expect(card.locator(".state")).to_have_text("succeeded")
    thumb = card.locator(".thumb img")
    await expect(thumb).to_be_visible(timeout=30_000)
    await page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=await thumb.element_handle()
    )
    assert "thumb.jpg" in (await thumb.get_attribute("src") or "")
    await expect(card.locator(".prompt")).to_have_text("a red boat on a calm sea")
    await expect(card.locator(".size")).to_have_text("128×128, 150 steps")
    await page.screenshot(path=shots / "gallery.png", full_page=True)

    filters = page.locator("#filters")
    await filters.locator("select[name=state]").select_option("failed")
    await expect(page.locator(".card")).to_have_count(0)
    await filters.locator("select[name=state]").select_option("succeeded")
    await filters.locator("select[name=model]").select_option(MODEL)
    await filters.locator("select[name=since]").select_option("3600")
    await expect(page.locator(".card")).to_have_count(1)
    await filters.locator("select[name=queue]").select_option("default")
    await expect(page.locator(".card")).to_have_count(1)

    await card.click()
    await expect(page.locator("#state")).to_have_text("succeeded")
    full = page.locator("#images img.full")
    await expect(full).to_have_count(1)
    await page.wait_for_function(
        "img => img.complete && img.naturalWidth === 128", arg=await full.element_handle()
    )
    await expect(page.locator("#params")).to_contain_text("a red boat on a calm sea")
    await expect(page.locator("#params")).not_to_contain_text("null")  # unset: "–", not JSON's word
    await expect(page.locator("#output")).to_contain_text('"seed"')
    await expect(page.locator("#timings")).to_contain_text("runtime_run")
    await expect(page.locator("#cancel")).to_be_disabled()
    await page.screenshot(path=shots / "task.png", full_page=True)


async def test_the_form_allows_what_the_api_takes(page: Page, fleet: UpProcess) -> None:
    """The form's bounds are the API's own (its size limit, the task model's ranges): the browser
    stops only what the API would refuse. The page's own files load too, its icon among them."""
    async with page.expect_response(lambda r: "favicon" in r.url) as icon:
        await page.goto(f"{fleet.url}/ui")
    assert (await icon.value).status == 200, (await icon.value).url
    cases = {
        "width": [("8", True), (str(MAX_WIDTH), True), (str(MAX_WIDTH + 8), False), ("12", False)],
        "height": [("2048", True), ("2056", False), ("0", False)],
        "steps": [("1", True), ("150", True), ("151", False)],
        "cfg_scale": [("0", True), ("30", True), ("30.5", False)],
        "seed": [("-1", True), (str(2**32 - 1), True), (str(2**32), False)],
        "denoising_strength": [("0", True), ("0.35", True), ("1", True), ("1.05", False)],
    }
    for name, values in cases.items():
        field = page.locator(f"input[name={name}]")
        for value, valid in values:
            await field.fill(value)
            assert await field.evaluate("el => el.checkValidity()") is valid, (name, value)


def png_bytes(size: tuple[int, int], color: object, box: tuple[int, int, int, int] | None = None) -> bytes:
    import io

    from PIL import Image

    mode = "L" if isinstance(color, int) else "RGB"
    image = Image.new(mode, size, color)
    if box is not None:
        image.paste(255 if mode == "L" else (0, 0, 255), box)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def test_image_to_image_and_inpainting_from_the_form(page: Page, fleet: UpProcess, shots: Path) -> None:
    """The form took a prompt only: an input image and a mask picked from files make an
    image-to-image or inpainting task, the inputs drawn at the task's size (a large photo stays
    under the API's body limit); the task page names the mask without its megabytes of text."""
    await page.goto(f"{fleet.url}/ui")
    await use_key(page, ALICE)
    await page.fill("textarea[name=prompt]", "a blue square on red")
    await page.set_input_files(
        "input[name=mask]",
        files=[
            {
                "name": "mask.png",
                "mimeType": "image/png",
                "buffer": png_bytes((300, 200), 0, (100, 50, 200, 150)),
            }
        ],
    )
    await page.click("#submit-button")
    await expect(page.locator("#notice")).to_contain_text("Not submitted: a mask needs an input image")
    photo = png_bytes((1200, 800), (200, 30, 30), (400, 200, 800, 600))
    await page.set_input_files(
        "input[name=init_image]", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": photo}]
    )
    for name, value in (("width", "64"), ("height", "64"), ("steps", "4"), ("denoising_strength", "0.6")):
        await page.fill(f"input[name={name}]", value)
    await page.click("#submit-button")
    await expect(page.locator("#notice")).to_contain_text("Submitted")
    card = page.locator(".card").first
    await expect(card.locator(".state")).to_have_text("succeeded", timeout=300_000)
    await card.click()
    task_id = await page.locator("#task").get_attribute("data-task-id")
    await expect(page.locator("#params")).to_contain_text("image-to-image")
    await expect(page.locator("#params")).to_contain_text("an image (")
    await expect(page.locator("#params")).not_to_contain_text("base64")
    await expect(page.locator("#output")).to_contain_text("Inpaint area: Only masked")
    full = page.locator("#images img.full")
    await page.wait_for_function(
        "img => img.complete && img.naturalWidth === 64", arg=await full.element_handle()
    )
    await page.screenshot(path=shots / "inpainted.png", full_page=True)
    with fleet.client(ALICE) as http:
        view = http.get(f"/v1/tasks/{task_id}").json()
    assert (view["type"], view["state"]) == ("image-to-image", "succeeded"), view


async def test_the_pages_fit_a_phones_width(page: Page, fleet: UpProcess, shots: Path) -> None:
    """At 390 px nothing is wider than the screen: the form in two columns, the key on its own row,
    a task's page in one column with its long image key wrapped (no sideways scrolling)."""
    with fleet.client(ALICE) as http:
        task_id = http.post(
            "/v1/tasks", json={"params": {"prompt": "a kite", "steps": 1, "width": 64, "height": 64}}
        ).json()["id"]
        deadline = time.monotonic() + 120
        while http.get(f"/v1/tasks/{task_id}").json()["state"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    await page.set_viewport_size({"width": 390, "height": 844})
    wider = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    await page.goto(f"{fleet.url}/ui")
    await use_key(page, ALICE)
    await expect(page.locator(f".card[data-task-id='{task_id}'] .state")).to_have_text("succeeded")
    await expect(page.locator(f".card[data-task-id='{task_id}'] .size")).to_have_text("64×64, 1 step")
    assert await page.evaluate(wider) == 0
    await page.screenshot(path=shots / "gallery-phone.png", full_page=True)
    await page.goto(f"{fleet.url}/ui/tasks/{task_id}")
    await expect(page.locator("#state")).to_have_text("succeeded")
    await expect(page.locator("#images .caption")).to_have_count(1)
    assert await page.evaluate(wider) == 0
    await page.screenshot(path=shots / "task-phone.png", full_page=True)


async def test_cancel_a_running_task(page: Page, fleet: UpProcess, shots: Path) -> None:
    await page.goto(f"{fleet.url}/ui")
    await use_key(page, ALICE)
    # 150 steps at 64² ran out (about a second) on an idle machine before the click reached it,
    # and at 256² once on a clean clone's loaded one (the full-page screenshot between takes time)
    await submit_from_form(page, "a very long walk", size=512, steps=150)
    await page.locator(".card").first.click()
    await expect(page.locator("#state")).to_have_text("running", timeout=300_000)
    await page.wait_for_function("() => document.getElementById('progress').value > 0", timeout=300_000)
    await page.screenshot(path=shots / "running.png", full_page=True)
    await page.click("#cancel")
    await expect(page.locator("#state")).to_have_text("cancelled")
    task_id = await page.locator("#task").get_attribute("data-task-id")
    with fleet.client(ALICE) as http:
        assert http.get(f"/v1/tasks/{task_id}").json()["state"] == "cancelled"
    await page.reload()
    await expect(page.locator("#state")).to_have_text("cancelled")
    await expect(page.locator("#cancel")).to_be_disabled()
    await page.screenshot(path=shots / "cancelled.png", full_page=True)


async def test_a_queued_tasks_failed_try_reads_as_one(
    page: Page, fleet: UpProcess, shots: Path, unavailable_input: str
) -> None:
    """A task waiting for its next try carries the last try's error; the pages used to show it as
    the task's end (the task page in red under ``queued``, the card naming the error's code)."""
    body = {
        "type": "image-to-image",
        "params": {
            "prompt": "a harbour",
            "width": 64,
            "height": 64,
            "steps": 2,
            "init_images": [unavailable_input],
        },
    }
    with fleet.client(ALICE) as http:
        task_id = http.post("/v1/tasks", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while (view := http.get(f"/v1/tasks/{task_id}").json())["error"] is None:
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
    assert view["state"] == "queued", view
    await page.goto(f"{fleet.url}/ui/tasks/{task_id}")
    await use_key(page, ALICE)
    await expect(page.locator("#state")).to_have_text("queued")
    error = page.locator("#error")
    await expect(error).to_be_visible()
    tried_again = re.compile(r"^last try failed: input_fetch_failed: .*HTTP 503 \(it is tried again\)$")
    await expect(error).to_have_text(tried_again)
    await expect(error).to_have_class("error retrying")
    await expect(page.locator("#delete")).to_be_disabled()  # a task in flight is cancelled first
    await page.screenshot(path=shots / "task-retrying.png", full_page=True)
    await page.goto(f"{fleet.url}/ui")
    card = page.locator(f".card[data-task-id='{task_id}']")
    await expect(card.locator(".state")).to_have_text("queued")
    await expect(card.locator(".placeholder")).to_have_text("queued")
    await expect(card).to_have_attribute("title", re.compile(r"· last try failed: input_fetch_failed$"))
    await page.screenshot(path=shots / "gallery-retrying.png", full_page=True)
    await page.goto(f"{fleet.url}/ui/tasks/{task_id}")
    await page.click("#cancel")  # an ended task's error reads as its end's: no longer "tried again"
    await expect(page.locator("#state")).to_have_text("cancelled")
    await expect(error).to_have_text(re.compile(r"^input_fetch_failed: .*503$"))
    await expect(error).to_have_class("error")


async def test_a_task_run_again_shows_its_run(page: Page, fleet: UpProcess, shots: Path) -> None:
    """A seed-format id sent again after it finished runs again (as ``sdfleet dlq redrive`` runs a
    failed task's next run): its page says which run it shows."""
    body = {
        "task": {
            "metadata": {
                "id": "ui-rerun",
                "runtime": "sdruntime",
                "tasktype": "text-to-image",
                "prefix": "out",
            },
            "content": {"prompt": "a tide pool", "steps": 2, "width": 64, "height": 64},
        }
    }
    with fleet.client(ALICE) as http:
        for run in (1, 2):
            assert http.post("/v1alpha2/", json=body).status_code == 200
            deadline = time.monotonic() + 120
            while (view := http.get("/v1/tasks/ui-rerun").json())["state"] != "succeeded" or view[
                "run"
            ] != run:
                assert time.monotonic() < deadline, view
                time.sleep(0.2)
    await page.goto(f"{fleet.url}/ui/tasks/ui-rerun")
    await use_key(page, ALICE)
    await expect(page.locator("#state")).to_have_text("succeeded")
    run_row = page.locator("#params tr", has=page.locator("td", has_text=re.compile(r"^run$")))
    await expect(run_row.locator("td").nth(1)).to_have_text("2")
    await page.screenshot(path=shots / "task-run-2.png", full_page=True)


async def test_a_finished_task_says_how_long_it_is_kept(page: Page, fleet: UpProcess) -> None:
    """The fleet keeps finished tasks ``retain_days``: the task page says until when, in the
    browser's own time; a task still queued or running says nothing of it. (The page shows the
    task's priority and ttl_s too.)"""
    with fleet.client(ALICE) as http:
        params = {"prompt": "a kept lighthouse", "width": 64, "height": 64, "steps": 2}
        body = {"params": params, "priority": 3, "ttl_s": 600}
        task_id = http.post("/v1/tasks", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while (view := http.get(f"/v1/tasks/{task_id}").json())["state"] != "succeeded":
            assert view["expires_at"] is None, view
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
    assert view["expires_at"] == pytest.approx(view["finished_at"] + RETAIN_DAYS * 86400)
    await page.goto(f"{fleet.url}/ui/tasks/{task_id}")
    await use_key(page, ALICE)
    await expect(page.locator("#state")).to_have_text("succeeded")
    kept = page.locator("#params tr", has=page.locator("td", has_text=re.compile(r"^kept until$")))
    shown = await page.evaluate("t => new Date(t * 1000).toLocaleString()", view["expires_at"])
    await expect(kept.locator("td").nth(1)).to_have_text(shown)
    priority = page.locator("#params tr", has=page.locator("td", has_text=re.compile(r"^priority$")))
    await expect(priority.locator("td").nth(1)).to_have_text("3")
    ttl = page.locator("#params tr", has=page.locator("td", has_text=re.compile(r"^start within$")))
    await expect(ttl.locator("td").nth(1)).to_have_text("600 s of its submit (ttl_s)")


async def test_a_finished_task_is_deleted_from_its_page(page: Page, fleet: UpProcess, shots: Path) -> None:
    """Delete asks first; once confirmed the task's images and record are gone (the API says 404,
    its image link too); dismissing the question deletes nothing."""
    with fleet.client(ALICE) as http:
        body = {"params": {"prompt": "a deleted lighthouse", "width": 64, "height": 64, "steps": 2}}
        task_id = http.post("/v1/tasks", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while (view := http.get(f"/v1/tasks/{task_id}").json())["state"] != "succeeded":
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
    await page.goto(f"{fleet.url}/ui/tasks/{task_id}")
    await use_key(page, ALICE)
    await expect(page.locator("#state")).to_have_text("succeeded")
    await expect(page.locator("#images img")).to_have_count(1)
    questions: list[str] = []

    async def answer(dialog: Dialog) -> None:
        questions.append(dialog.message)
        await (dialog.accept() if len(questions) > 1 else dialog.dismiss())

    page.on("dialog", answer)
    await page.click("#delete")  # dismissed: nothing happens
    await expect(page.locator("#delete")).to_be_enabled()
    with fleet.client(ALICE) as http:
        assert http.get(f"/v1/tasks/{task_id}").status_code == 200
    await page.click("#delete")
    await expect(page.locator("#state")).to_have_text("deleted")
    await expect(page.locator("#notice")).to_have_text("Deleted: its images and record are gone.")
    await expect(page.locator("#images img")).to_have_count(0)
    await expect(page.locator("#delete")).to_be_disabled()
    assert questions == ["Delete this task, its images and its record? This cannot be undone."] * 2
    await page.screenshot(path=shots / "task-deleted.png", full_page=True)
    with fleet.client(ALICE) as http:
        assert http.get(f"/v1/tasks/{task_id}").status_code == 404
        assert http.get(view["images"][0]["url"]).status_code == 404


async def test_a_second_tenant_sees_none_of_the_first_ones_tasks(
    page: Page, fleet: UpProcess, shots: Path
) -> None:
    with fleet.client(ALICE) as http:
        body = {"params": {"prompt": "alice's secret garden", "width": 64, "height": 64, "steps": 2}}
        alice_task = http.post("/v1/tasks", json=body).json()["id"]
    await page.goto(f"{fleet.url}/ui")
    await use_key(page, BOB)
    await expect(page.locator("#empty")).to_be_visible()
    await expect(page.locator(".card")).to_have_count(0)
    await expect(page.locator("#more")).to_be_hidden()
    await expect(page.locator("#grid")).not_to_contain_text("secret garden")
    await page.screenshot(path=shots / "bob-gallery.png", full_page=True)
    await page.goto(f"{fleet.url}/ui/tasks/{alice_task}")
    await expect(page.locator("#state")).to_have_text("not found")
    await expect(page.locator("#params")).to_be_empty()
    await expect(page.locator("#cancel")).to_be_hidden()
    await page.screenshot(path=shots / "bob-task.png", full_page=True)
    with fleet.client(BOB) as http:  # the page's own routes hold the line too
        assert http.get(f"/ui/api/cards?ids={alice_task}").json() == {"cards": {}}
        assert http.get(f"/ui/api/tasks/{alice_task}").status_code == 404
    # In alice's session storage only: a new tab (context) starts without a key.
    other = await page.context.browser.new_context()  # type: ignore[union-attr]
    try:
        fresh = await other.new_page()
        await fresh.goto(f"{fleet.url}/ui")
        await expect(fresh.locator("#key-state")).to_have_text("no key")
        await expect(fresh.locator("#notice")).to_contain_text("API key")
    finally:
        await other.close()


async def test_the_api_docs_render_from_the_api_alone(page: Page, fleet: UpProcess, shots: Path) -> None:
    """``/docs`` and ``/redoc`` loaded Swagger UI and ReDoc from a CDN: a browser that reaches only
    the API (an air-gapped cluster, a port-forward) saw blank pages. Every request elsewhere is
    refused here, and recorded."""
    elsewhere: list[str] = []

    async def only_the_api(route: Route) -> None:
        url = route.request.url
        if url.startswith((f"{fleet.url}/", "data:", "blob:")):
            await route.continue_()
        else:
            elsewhere.append(url)
            await route.abort()

    await page.route("**/*", only_the_api)
    refused: list[str] = []  # what the pages' Content-Security-Policy kept the browser from doing
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    await page.goto(f"{fleet.url}/docs")
    submit = page.locator(".opblock-post .opblock-summary-path[data-path='/v1/tasks']")
    await expect(submit).to_be_visible()
    await submit.click()  # the operation opens: its request body schema is rendered
    await expect(page.locator(".opblock-post.is-open .opblock-section-request-body")).to_be_visible()
    await page.screenshot(path=shots / "docs.png", full_page=False)
    await page.goto(f"{fleet.url}/redoc")
    await expect(page.locator("h1", has_text="sdfleet")).to_be_visible()
    await expect(page.locator("h2", has_text="Create Task")).to_be_visible()  # an operation, rendered
    await page.locator("input[placeholder^='Search']").fill("cancel")  # its search runs in a worker
    await expect(page.locator("[data-role='search:results'] li").first).to_be_visible()
    await page.screenshot(path=shots / "redoc.png", full_page=False)
    assert elsewhere == [], elsewhere
    # only ReDoc's hard-coded logo (https://cdn.redoc.ly/...), which the page hides when it fails
    assert all("cdn.redoc.ly" in r for r in refused), refused
    with fleet.client() as http:
        for path in ("/docs", "/redoc"):
            assert "cdn." not in http.get(path).text, path

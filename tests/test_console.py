"""The operator console in a real browser: Debian's chromium driven by Playwright against a
real Airflow (api-server, scheduler, dag-processor, triggerer) on a loopback port, with an
admin and a read-only user (tests/console_support.py). Screenshots go to tests/artifacts/
(ignored by git)."""
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from console_support import (ARTIFACTS, dag_state, login, map_counts, plugin, run_page,
                             trigger, until, wait_dag_run)


def test_console_refuses_anonymous_users(console_airflow):
    for path in ("/", "/api/runs", "/run/x", "/dag-run/console/x"):
        with pytest.raises(urllib.error.HTTPError) as err:
            plugin(console_airflow, path)
        assert err.value.code in (401, 403), path


def test_a_run_triggered_from_the_form_and_watched_in_the_browser(console_airflow, browser):
    """The trigger form shows per-run fields only, in pipeline order, `[x, y, z]` as one-line
    text, the segmentation's keys with no layer (so no segmentation) and the config's
    defaults; a run triggered from it with a changed chunk runs that chunk. Its DAG run's tab
    follows it to 100 %, the chunk maps all done; the runs page lists it with its DAG run,
    cost and output."""
    af = console_airflow
    page = login(browser, af, "admin")
    page.goto(f"{af.url}/dags/console")
    page.get_by_role("button", name="Trigger").first.click()
    sections = [b.inner_text() for b in page.query_selector_all(
        "[role=dialog] button[data-part=item-trigger]")]
    assert sections == ["volume", "mask", "normalize", "model", "inference", "output",
                        "segmentation", "downsample", "workers", "Advanced Options"]
    assert not page.query_selector("[id^='element_queue.'], [id^='element_cost.'], "
                                   "[id*='.gce.']")
    page.get_by_role("button", name="segmentation", exact=True).click()
    assert page.locator("[id='element_segmentation.output']").input_value() == ""
    # a number field: the id is the NumberInput's root, the input carries the name
    assert page.locator("[name='element_segmentation.threshold']").input_value() == "0.5"
    page.get_by_role("button", name="inference").click()
    chunk = page.locator("[id='element_inference.chunk']")
    assert chunk.evaluate("e => e.tagName + ' ' + e.type") == "INPUT text"
    assert chunk.input_value() == "32 32 8"
    chunk.fill("64 64 8")
    page.get_by_role("button", name="output", exact=True).click()
    page.locator("[id='element_output']").fill(f"{af.data}/from-form")
    page.screenshot(path=str(ARTIFACTS / "console-trigger-form.png"), full_page=True)
    page.get_by_role("button", name="Trigger").last.click()
    deadline = time.monotonic() + 60
    while not (runs := [r for r in af.api("GET", "/dags/console/dagRuns")["dag_runs"]
                        if (r["conf"] or {}).get("output") == f"{af.data}/from-form"]):
        assert time.monotonic() < deadline, "the form's DAG run never appeared"
        time.sleep(0.5)
    dag_run = runs[0]["dag_run_id"]
    assert runs[0]["conf"]["inference.chunk"] == "64 64 8"
    run_page(page, af, dag_run)
    until(page, lambda p: "inference" in map_counts(p), timeout=180)
    page.screenshot(path=str(ARTIFACTS / "console-run-working.png"), full_page=True)
    # the inference group while it works: sized and running (its state folder), busy
    found = plugin(af, f"/api/dag-runs/console/{urllib.parse.quote(dag_run, safe='')}",
                   af.tok)
    detail = f"/api/runs/{found['run']}?queue={urllib.parse.quote(found['queue'], safe='')}"
    seen = []
    while dag_state(af, dag_run) not in ("success", "failed"):
        (inference,) = [w for w in plugin(af, detail, af.tok)["workers"]
                        if w["kind"] == "inference"]
        seen.append(inference)
        if inference["running"] and inference["target"]:
            break
        time.sleep(0.3)
    assert inference["group"] == "local://2" and 1 <= inference["target"] <= 2, seen
    # Neuroglancer on both layers (local: as `voxflow view` serves them), at the bbox centre
    got = plugin(af, detail, af.tok)
    state = json.loads(urllib.parse.unquote(got["neuroglancer"].split("#!", 1)[1]))
    assert [l["name"] for l in state["layers"]] == ["image", "from-form"]
    assert state["position"] == [64, 64, 8] and state["dimensions"]["z"] == [40e-9, "m"]
    assert got["view_command"] == f"voxflow view file://{af.data}/image file://{af.data}/from-form"
    assert wait_dag_run(af, dag_run, ("success", "failed")) == "success"
    until(page, lambda p: "succeeded" in p.inner_text("#head")
          and set(map_counts(p)) == {"inference", "downsample-0"})
    counts = map_counts(page)
    assert counts["inference"]["done"] == 8 and counts["downsample-0"]["done"] == 8
    until(page, lambda p: [(r.query_selector(".target").inner_text(),
                            r.query_selector(".running").inner_text())
                           for r in p.query_selector_all("#workers tbody tr")]
          == [("0", "0"), ("0", "0")])         # scaled to zero once done
    assert all(n == 0 for c in counts.values() for s, n in c.items() if s != "done")
    assert "100 %" in page.inner_text("#head")
    rows = page.query_selector_all("#stages tbody tr")
    assert [r.get_attribute("data-stage") for r in rows] == ["inference", "downsample-0"]
    until(page, lambda p: p.evaluate(
        "document.getElementById('preview-output').naturalWidth") == 128)
    page.screenshot(path=str(ARTIFACTS / "console-run-done.png"), full_page=True)
    _assert_preview_is_the_output_section(af, dag_run)
    page.goto(f"{af.url}/voxflow/")
    until(page, lambda p: p.query_selector_all("#runs tbody tr[data-run]"))
    text = page.inner_text("#runs")
    assert "console / " + dag_run in text and "succeeded" in text and "voxflow view" in text
    page.screenshot(path=str(ARTIFACTS / "console-runs.png"), full_page=True)


def _assert_preview_is_the_output_section(af, dag_run):
    """The preview PNG is the output's middle z section (mip 0 fits 512 px): uint8 as it
    is, floats over [0, 1]."""
    import io

    import numpy as np
    from PIL import Image

    from voxflow.geometry import Box
    from voxflow.volume import Volume
    found = plugin(af, f"/api/dag-runs/console/{urllib.parse.quote(dag_run, safe='')}",
                   af.tok)
    req = urllib.request.Request(
        f"{af.url}/voxflow/api/runs/{found['run']}/preview/output.png?queue="
        f"{urllib.parse.quote(found['queue'], safe='')}",
        headers={"Authorization": f"Bearer {af.tok}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        shown = np.asarray(Image.open(io.BytesIO(r.read())))
    section = Volume(f"file://{af.data}/from-form").read(Box((0, 0, 8), (128, 128, 9)))[0, 0]
    assert shown.shape == (128, 128) and shown.std() > 0
    expected = section if section.dtype == np.uint8 else \
        (np.clip(section, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(shown, expected)


def test_a_refusal_at_plan_is_shown_on_the_run_page(console_airflow, browser):
    af = console_airflow
    dag_run = trigger(af, {"output": f"{af.data}/refused", "inference.patch_overlap": "32 8 2"})
    assert wait_dag_run(af, dag_run, ("success", "failed")) == "failed"
    page = login(browser, af, "viewer")
    run_page(page, af, dag_run)
    until(page, lambda p: "refused" in p.inner_text("#refused"))
    shown = page.inner_text("#refused")
    assert "refused at plan, nothing published: inference.patch_overlap:" in shown
    assert not (af.data / "refused").exists()
    # and the DAG run's note, where Airflow's own pages show it (set by the listener)
    note = af.api("GET", f"/dags/console/dagRuns/{urllib.parse.quote(dag_run)}")["note"]
    assert note == shown.strip()


def test_a_dead_letter_is_shown_and_retried(console_airflow, browser):
    """A poisoned task dies; the run page shows it with its box and error (traceback on
    click); a read-only user sees no retry button and is refused; the admin's retry makes
    the DAG run resume and succeed."""
    poison = console_airflow.data / "poison"
    poison.write_text("")
    dag_run = trigger(console_airflow, {"downsample.mips": 0, "inference.chunk": "64 64 8",
                                        "output": f"{console_airflow.data}/poisoned"})
    assert wait_dag_run(console_airflow, dag_run, ("success", "failed")) == "failed"

    viewer = login(browser, console_airflow, "viewer")
    run_page(viewer, console_airflow, dag_run)
    until(viewer, lambda p: p.query_selector("tr.dead-letter") is not None)
    letter = viewer.query_selector("tr.dead-letter")
    assert letter.get_attribute("data-index") == "0"
    assert "RuntimeError: poisoned patch" in letter.inner_text()
    assert "0 0 0 – 64 64 8" in letter.inner_text()                     # the task's box
    letter.query_selector("summary").click()
    assert "Traceback" in letter.query_selector("pre").inner_text()
    seen = int(viewer.get_attribute("body", "data-refreshes"))
    until(viewer, lambda p: int(p.get_attribute("body", "data-refreshes")) >= seen + 2)
    # the page's refreshes left the row, and the traceback the user opened, as they were
    assert letter.evaluate("e => e.isConnected && e.querySelector('details').open")
    assert viewer.query_selector("button.retry") is None
    assert "read-only" in viewer.inner_text("#retry-all")
    viewer.screenshot(path=str(ARTIFACTS / "console-dead-letter-viewer.png"), full_page=True)
    refused = viewer.evaluate("""async () => (await fetch(location.pathname.split('/dag-run/')[0]
        + '/api/runs/' + encodeURIComponent(RUN) + '/retry?queue=' + encodeURIComponent(QUEUE),
        {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'})).status""")
    assert refused == 403
    assert dag_state(console_airflow, dag_run) == "failed"

    poison.unlink()
    admin = login(browser, console_airflow, "admin")
    run_page(admin, console_airflow, dag_run)
    until(admin, lambda p: p.query_selector("button.retry") is not None)
    admin.click("button.retry")
    until(admin, lambda p: "retried" in p.inner_text("#retry-result"))
    assert "1 task(s) retried; the DAG run resumes them" in admin.inner_text("#retry-result")
    assert wait_dag_run(console_airflow, dag_run, ("success",), timeout=300) == "success"
    until(admin, lambda p: "succeeded" in p.inner_text("#head")
           and p.query_selector("tr.dead-letter") is None)
    assert map_counts(admin) == {"inference": {"pending": 0, "leased": 0, "done": 8,
                                               "dead": 0, "unpublished": 0, "skipped": 0}}
    admin.screenshot(path=str(ARTIFACTS / "console-retried.png"), full_page=True)


def test_a_retry_must_be_same_origin_json(console_airflow):
    runs = plugin(console_airflow, "/api/runs", console_airflow.tok)
    assert runs, "the other tests' runs are listed"
    run, queue = runs[0]["run"], urllib.parse.quote(runs[0]["queue"], safe="")
    with pytest.raises(urllib.error.HTTPError) as err:       # what a form could send
        plugin(console_airflow, f"/api/runs/{run}/retry?queue={queue}",
               console_airflow.tok, {}, content_type="text/plain")
    assert err.value.code in (415, 422)
    url = f"{console_airflow.url}/voxflow/api/runs/{run}/retry?queue={queue}"
    req = urllib.request.Request(url,
                                 b"{}", method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {console_airflow.tok}",
                                          "Origin": "http://evil.example"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 403

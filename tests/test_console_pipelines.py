"""The console's pipelines page in a real browser (Debian's chromium through Playwright)
against the shared console Airflow (tests/console_support.py): a bad edit is refused and
the file stays as it was, a good one becomes a new DAG version in Airflow with the previous
text kept, and neither a read-only user nor a read-only DAG folder can save. Screenshots
go to tests/artifacts/."""
import json
import time
import urllib.error
import urllib.request

import pytest

from console_support import ARTIFACTS, login, plugin, until

SAVE_JS = """async (text) => {
  const r = await fetch(BASE + '/api/pipelines/editable', {method: 'PUT',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify({text})});
  return [r.status, await r.json()];
}"""


def folder(af):
    return af.data.parent / "dags" / "pipelines"


def put(af, name, body, token, **headers):
    """PUT a pipeline through the plugin's API; (status, JSON body)."""
    req = urllib.request.Request(f"{af.url}/voxflow/api/pipelines/{name}",
                                 json.dumps(body).encode(), method="PUT",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def open_editor(page, af, name="editable"):
    page.goto(f"{af.url}/voxflow/pipelines?edit={name}")
    until(page, lambda p: "description" in p.input_value("#text"), timeout=60)
    return page


def test_pipelines_refuse_anonymous_and_foreign_requests(console_airflow):
    af = console_airflow
    for path in ("/pipelines", "/api/pipelines", "/api/pipelines/editable"):
        with pytest.raises(urllib.error.HTTPError) as err:
            plugin(af, path)
        assert err.value.code in (401, 403), path
    path = folder(af) / "editable.yaml"
    before = path.read_bytes()
    text = before.decode().replace("a pipeline", "a foreign pipeline")
    assert put(af, "editable", {"text": text}, "not-a-token")[0] in (401, 403)
    # a page elsewhere cannot make a logged-in browser save (CSRF)
    assert put(af, "editable", {"text": text}, af.tok, Origin="http://evil.example")[0] == 403
    assert put(af, "../console", {"text": text}, af.tok)[0] == 404
    assert path.read_bytes() == before


def _tags(af, dag_id: str) -> list[str]:
    try:
        return [t["name"] for t in af.api("GET", f"/dags/{dag_id}", token=af.tok)["tags"]]
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        return []


def test_pipelines_are_listed_with_state_and_plan(console_airflow):
    """Each file with its validity (a bad one names its file and field), keys and the plan's
    tasks per stage and dollars; the plan is read in the background, so poll until it is."""
    af = console_airflow
    broken = folder(af) / "broken.yaml"
    broken.write_text((folder(af) / "editable.yaml").read_text()
                      .replace("chunk: [64, 64, 8]", "chunk: [64, 64]"))
    try:
        deadline = time.monotonic() + 60
        while True:
            listed = {p["name"]: p for p in plugin(af, "/api/pipelines", af.tok)["pipelines"]}
            if not any((p["plan"] or {}).get("pending") for p in listed.values()):
                break
            assert time.monotonic() < deadline, listed
            time.sleep(1)
        # Airflow too: the bad file is a DAG tagged refused, and the others stay live
        deadline = time.monotonic() + 90
        while "refused" not in _tags(af, "broken"):
            assert time.monotonic() < deadline, "the refused DAG never appeared"
            time.sleep(1)
        for name in ("console", "editable"):
            assert not af.api("GET", f"/dags/{name}", token=af.tok)["is_stale"], name
    finally:
        broken.unlink()
    assert {"console", "editable", "broken"} <= set(listed)
    bad = listed["broken"]
    assert not bad["valid"] and bad["plan"] is None
    assert bad["error"]["file"] == "pipelines/broken.yaml"
    assert bad["error"]["field"] == "inference.chunk" and bad["error"]["line"] == 6
    console = listed["console"]
    assert console["valid"] and console["may_edit"]
    assert console["plan"]["tasks"] == {"inference": 32, "downsample-0": 8}
    assert console["plan"]["estimate_usd"] > 0
    editable = listed["editable"]
    assert editable["assets"] == [f"file://{af.data}/upstream"]
    assert editable["schedule"] is None and editable["watch"] == []
    assert editable["plan"]["tasks"]["inference"] == 8       # 128×128×16 in 64×64×8 chunks
    assert isinstance(editable["runs"], list)


def test_an_invalid_edit_shows_the_field_error_and_saves_nothing(console_airflow, browser):
    af = console_airflow
    path = folder(af) / "editable.yaml"
    before = path.read_bytes()
    history = sorted((folder(af) / ".history").glob("*"))
    page = open_editor(login(browser, af, "admin"), af)
    until(page, lambda p: "valid: this file becomes a DAG" in p.inner_text("#errors"))
    page.fill("#text", before.decode().replace("blend: crop", "blend: sideways"))
    until(page, lambda p: p.query_selector('#errors li[data-field="inference.blend"]'))
    assert "line 6" in page.inner_text("#errors")
    page.click("#save")                  # the server decides, whatever the page last showed
    until(page, lambda p: "not saved" in p.inner_text("#save-result"))
    assert page.query_selector('#errors li[data-field="inference.blend"]')
    page.screenshot(path=str(ARTIFACTS / "pipelines-invalid.png"), full_page=True)
    page.fill("#text", before.decode() + "inference: [\n")
    until(page, lambda p: "not valid YAML" in p.inner_text("#errors"))
    assert "line " in page.inner_text("#errors")
    assert path.read_bytes() == before
    assert sorted((folder(af) / ".history").glob("*")) == history


def _versions(af) -> int:
    return af.api("GET", "/dags/editable/dagVersions", token=af.tok)["total_entries"]


def test_a_valid_edit_becomes_a_new_dag_version(console_airflow, browser):
    """Saved through the page, the file is what Airflow parses next: the DAG gets a new
    version carrying the new description, and the previous text is kept beside it."""
    af = console_airflow
    path = folder(af) / "editable.yaml"
    before_versions = _versions(af)
    # Airflow rewrites a version no task instance uses in place: give this one a (paused,
    # never running) DAG run so that a changed file must make a new version
    af.api("PATCH", "/dags/editable", {"is_paused": True}, token=af.tok)
    af.api("POST", "/dags/editable/dagRuns", {"logical_date": None}, token=af.tok)
    before = path.read_bytes()
    new = before.decode().replace("a pipeline the console's editor tests change",
                                  "edited in the browser")
    assert new != before.decode()
    page = open_editor(login(browser, af, "admin"), af)
    page.fill("#text", new)
    until(page, lambda p: "valid: this file becomes a DAG" in p.inner_text("#errors"))
    page.click("#save")
    until(page, lambda p: "saved;" in p.inner_text("#save-result"))
    assert path.read_text() == new
    kept = sorted((folder(af) / ".history").glob("editable.yaml.~*~"))[-1]
    assert kept.read_bytes() == before
    assert kept.name in page.inner_text("#save-result")
    assert not [p for p in folder(af).iterdir() if p.name.endswith(".tmp")]
    deadline = time.monotonic() + 90          # the dag-processor re-parses every 10 s
    while _versions(af) <= before_versions:
        assert time.monotonic() < deadline, "Airflow made no new version of the DAG"
        time.sleep(1)
    details = af.api("GET", "/dags/editable/details", token=af.tok)
    assert details["description"] == "edited in the browser"
    until(page, lambda p: f"DAG v{before_versions + 1}" in p.inner_text("#pipelines"), 30)
    assert "queued" in page.inner_text('#pipelines tr[data-pipeline="editable"]')
    page.screenshot(path=str(ARTIFACTS / "pipelines-saved.png"), full_page=True)


def test_a_viewer_sees_no_save_button_and_cannot_save(console_airflow, browser):
    af = console_airflow
    path = folder(af) / "editable.yaml"
    before = path.read_bytes()
    page = open_editor(login(browser, af, "viewer"), af)
    assert page.is_hidden("#save")
    assert page.eval_on_selector("#text", "t => t.readOnly")
    assert "needs permission to edit" in page.inner_text("#editor-note")
    assert page.inner_text('#pipelines tr[data-pipeline="editable"] button') == "view"
    page.screenshot(path=str(ARTIFACTS / "pipelines-viewer.png"), full_page=True)
    status, body = page.evaluate(SAVE_JS, before.decode() + "tags: [viewer]\n")
    assert status == 403 and "permission" in body["detail"]
    assert path.read_bytes() == before


def test_a_read_only_dag_folder_makes_the_page_read_only(console_airflow, browser):
    af = console_airflow
    pipelines = folder(af)
    path = pipelines / "editable.yaml"
    before, mode = path.read_bytes(), pipelines.stat().st_mode
    pipelines.chmod(0o555)
    try:
        page = open_editor(login(browser, af, "admin"), af)
        until(page, lambda p: "is read-only" in p.inner_text("#read-only"))
        assert page.is_hidden("#save")
        assert "is read-only" in page.inner_text("#editor-note")
        page.screenshot(path=str(ARTIFACTS / "pipelines-read-only.png"), full_page=True)
        status, body = page.evaluate(SAVE_JS, before.decode() + "tags: [read-only]\n")
        assert status == 409 and "read-only" in body["detail"]
    finally:
        pipelines.chmod(mode)
    assert path.read_bytes() == before

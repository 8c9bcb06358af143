"""Every Qiniu endpoint through real HTTP, real images, real signatures (the official SDK's QiniuMacAuth)."""

from __future__ import annotations

import json

from PIL import Image, ImageOps

from tests.conftest import ImageServer, QiniuClient, Tusou, data_uri, jpeg


def entry(image: Image.Image, image_id: str | None = None, label: str | None = None, desc=None) -> dict:
    attribute = {k: v for k, v in (("id", image_id), ("label", label), ("desc", desc)) if v is not None}
    return {"uri": data_uri(jpeg(image)), "attribute": attribute}


def test_create_group_answers_as_the_page_shows(client: QiniuClient, photos: list[Image.Image]) -> None:
    body = {"data": [entry(photos[i], str(i + 1), "shoes") for i in range(4)]}
    resp = client.post("/v1/image/group/g1/new", body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Reqid"]
    assert resp.json() == {"errors": [None, None, None, None], "images": ["1", "2", "3", "4"]}

    again = client.post("/v1/image/group/g1/new", {"data": []})
    assert again.status_code == 400
    assert again.json() == {"error": "group already exists"}


def test_add_reports_each_bad_image_in_place(client: QiniuClient, photos: list[Image.Image]) -> None:
    assert client.post("/v1/image/group/g/new", {"data": [entry(photos[0], "a")]}).status_code == 200
    body = {
        "data": [
            entry(photos[1], "b", "bag", {"price": 12, "tags": ["x"]}),
            entry(photos[2], "a"),  # repeated id
            {"uri": "data:application/octet-stream;base64,bm90IGFuIGltYWdl"},  # "not an image"
            entry(photos[3], "c", desc="x" * 5000),
            entry(photos[4]),  # generated id
        ]
    }
    resp = client.post("/v1/image/group/g/add", body)
    assert resp.status_code == 200
    out = resp.json()
    assert out["images"][:4] == ["b", "", "", ""]
    assert out["errors"][0] is None and out["errors"][4] is None
    assert out["errors"][1] == {"code": 400, "message": "id already exists"}
    assert out["errors"][2]["code"] >= 400 and out["errors"][2]["message"]
    assert out["errors"][3] == {"code": 406, "message": "desc too long"}
    generated = out["images"][4]
    assert generated and generated not in ("a", "b")
    assert client.get("/v1/image/group/g/info").json() == {"count": 3}


def test_add_to_unknown_group(client: QiniuClient, photos: list[Image.Image]) -> None:
    resp = client.post("/v1/image/group/nope/add", {"data": [entry(photos[0])]})
    assert resp.status_code == 400
    assert resp.json() == {"error": "group nope not exists"}


def test_list_groups_info_image_and_remove(client: QiniuClient, photos: list[Image.Image]) -> None:
    client.post("/v1/image/group/1/new", {"data": [entry(photos[0], "x", "bag")]})
    client.post("/v1/image/group/2/new", {"data": []})
    assert client.get("/v1/image/group").json() == {"code": 0, "message": "", "result": ["1", "2"]}
    assert client.get("/v1/image/group/2/info").json() == {"count": 0}
    image = client.post("/v1/image/group/1/image", {"id": "x"})
    assert image.json() == {"desc": "", "label": "bag"}
    missing = client.post("/v1/image/group/1/image", {"id": "y"})
    assert missing.status_code == 400 and missing.json() == {"error": "image y not exists"}

    removed = client.post("/v1/image/group/1/remove")
    assert removed.status_code == 200 and removed.json() == {}
    assert client.get("/v1/image/group").json()["result"] == ["2"]
    gone = client.get("/v1/image/group/1/info")
    assert gone.status_code == 400 and gone.json() == {"error": "group 1 not exists"}


def test_list_images_pages_with_marker_and_limit(client: QiniuClient, photos: list[Image.Image]) -> None:
    data = [entry(photos[i % len(photos)].rotate(i), f"img{i}", "shoes") for i in range(7)]
    client.post("/v1/image/group/p/new", {"data": data})
    everything = client.get("/v1/image/group/p").json()
    assert everything["code"] == 0 and everything["message"] == "" and everything["marker"] == ""
    assert [r["id"] for r in everything["result"]] == [f"img{i}" for i in range(7)]
    assert everything["result"][0] == {"id": "img0", "value": {"desc": "", "label": "shoes"}}

    seen, marker = [], ""
    while True:
        page = client.get("/v1/image/group/p", {"marker": marker, "limit": 3}).json()
        seen += [r["id"] for r in page["result"]]
        marker = page["marker"]
        if not marker:
            break
        # A client deleting while another lists never makes the listing skip a surviving image.
        client.post("/v1/image/group/p/delete", {"images": [seen[-1]]})
    assert seen == [f"img{i}" for i in range(7)]
    for bad in ("0", "1001", "x"):
        assert client.get("/v1/image/group/p", {"limit": bad}).status_code == 400
    assert client.get("/v1/image/group/p", {"marker": "garbage!"}).json() == {"error": "invalid marker"}


def test_delete_images(client: QiniuClient, photos: list[Image.Image]) -> None:
    client.post("/v1/image/group/d/new", {"data": [entry(photos[i], f"{i}") for i in range(3)]})
    resp = client.post("/v1/image/group/d/delete", {"images": ["0", "2", "never-existed"]})
    assert resp.status_code == 200 and resp.json() == {}
    assert [r["id"] for r in client.get("/v1/image/group/d").json()["result"]] == ["1"]
    assert client.get("/v1/image/group/d/info").json() == {"count": 1}
    bad = client.post("/v1/image/group/d/delete", {"images": [True]})
    assert bad.status_code == 400 and bad.json() == {"error": "invalid images"}


def test_search_finds_near_duplicates_with_scores(
    client: QiniuClient, photos: list[Image.Image], image_server: ImageServer
) -> None:
    gallery = [entry(photos[i], f"s{i}", "scene", {"n": i}) for i in range(6)]
    client.post("/v1/image/group/shop/new", {"data": gallery})
    url = image_server.put("other.jpg", jpeg(photos[7]))
    client.post(
        "/v1/image/group/shop2/new", {"data": [{"uri": url, "attribute": {"id": "u7", "label": "l"}}]}
    )

    query = photos[3].resize((240, 180))
    body = {"data": {"uri": data_uri(jpeg(query, 40))}, "params": {"groups": ["shop", "shop2"], "limit": 5}}
    resp = client.post("/v1/image/groups/search", body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["code"] == 0 and out["message"] == ""
    top = out["result"][0]
    assert (
        top["id"] == "s3" and top["group"] == "shop" and top["label"] == "scene" and top["desc"] == {"n": 3}
    )
    assert 0.85 <= top["score"] <= 1.0
    scores = [hit["score"] for hit in out["result"]]
    assert scores == sorted(scores, reverse=True)

    # The URL-sourced image is found by its own near-duplicate, with its uri.
    body = {"data": {"uri": url}, "params": {"groups": ["shop", "shop2"], "threshold": 0.85}}
    hit = client.post("/v1/image/groups/search", body).json()["result"]
    assert hit == [
        {"desc": "", "group": "shop2", "id": "u7", "label": "l", "score": hit[0]["score"], "uri": url}
    ]

    # Legacy single-group search: same hits, no group field.
    legacy = client.post(
        "/v1/image/group/shop/search", {"data": {"uri": body_uri(query)}, "params": {"limit": 1}}
    )
    assert legacy.status_code == 200
    assert [{k: v for k, v in h.items() if k != "score"} for h in legacy.json()["result"]] == [
        {"desc": {"n": 3}, "id": "s3", "label": "scene"}
    ]


def body_uri(image: Image.Image) -> str:
    return data_uri(jpeg(image, 40))


def test_search_threshold_keeps_unrelated_images_out(client: QiniuClient, photos: list[Image.Image]) -> None:
    client.post("/v1/image/group/t/new", {"data": [entry(photos[i], f"s{i}") for i in range(4)]})
    body = {"data": {"uri": body_uri(photos[6])}, "params": {"groups": ["t"], "limit": -1}}
    assert client.post("/v1/image/groups/search", body).json()["result"] == []
    # A threshold below the system default is raised to it: still nothing.
    body["params"]["threshold"] = 0.0
    assert client.post("/v1/image/groups/search", body).json()["result"] == []
    # A mirrored copy is still the same image.
    body = {"data": {"uri": body_uri(ImageOps.mirror(photos[2]))}, "params": {"groups": ["t"], "limit": -1}}
    assert [h["id"] for h in client.post("/v1/image/groups/search", body).json()["result"]] == ["s2"]


def test_search_rejects_bad_parameters_with_406(client: QiniuClient, photos: list[Image.Image]) -> None:
    client.post("/v1/image/group/a/new", {"data": []})
    uri = body_uri(photos[0])
    cases = [
        {"data": {"uri": ""}, "params": {"groups": ["a"]}},
        {"data": {"uri": uri}, "params": {"groups": []}},
        {"data": {"uri": uri}, "params": {"groups": ["a", "b", "c"]}},
        {"data": {"uri": uri}, "params": {"groups": ["a"], "limit": 10001}},
        {"data": {"uri": uri}, "params": {"groups": ["a"], "limit": -2}},
        {"data": {"uri": uri}, "params": {"groups": ["a"], "threshold": 1.5}},
        {"data": {"uri": uri}, "params": {"groups": ["a"], "threshold": -0.1}},
    ]
    for body in cases:
        resp = client.post("/v1/image/groups/search", body)
        assert resp.status_code == 406, (body["params"], resp.text)
        assert set(resp.json()) == {"error"}
    unknown = client.post("/v1/image/groups/search", {"data": {"uri": uri}, "params": {"groups": ["zz"]}})
    assert unknown.status_code == 400 and unknown.json() == {"error": "group zz not exists"}


def test_bad_bodies_and_routes_get_qiniu_errors(client: QiniuClient) -> None:
    resp = client.session.post(
        client.base + "/v1/image/group/x/new",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        auth=client.auth,
    )
    assert resp.status_code == 400 and resp.json() == {"error": "invalid body"}
    assert client.post("/v1/image/group/x/new", {"data": "nope"}).status_code == 400
    assert client.post("/v1/image/group/x/new", [1, 2]).status_code == 400
    resp = client.get("/v1/nothing/here")
    assert resp.status_code == 404 and resp.json() == {"error": "not found"} and resp.headers["X-Reqid"]


def test_signatures_are_required(tusou: Tusou, client: QiniuClient) -> None:
    import requests

    resp = requests.get(tusou.server.url + "/v1/image/group", timeout=10)
    assert resp.status_code == 401 and resp.json() == {"error": "bad token"}
    wrong = QiniuClient(tusou.server.url, client.access_key, "not-the-secret")
    assert wrong.get("/v1/image/group").status_code == 401
    # The SDK always stamps X-Qiniu-Date with now; sign an old date with its signer directly.
    from qiniu import QiniuMacAuth

    mac = QiniuMacAuth(client.access_key, client.secret_key)
    mac.disable_qiniu_timestamp_signature = True
    headers = {"X-Qiniu-Date": "20200101T000000Z", "Content-Type": "application/x-www-form-urlencoded"}
    token = mac.token_of_request(
        "GET",
        f"127.0.0.1:{tusou.server.port}",
        tusou.server.url + "/v1/image/group",
        mac.qiniu_headers(headers),
        headers["Content-Type"],
        None,
    )
    headers["Authorization"] = "Qiniu " + token
    old = requests.get(tusou.server.url + "/v1/image/group", headers=headers, timeout=10)
    assert old.status_code == 403 and set(old.json()) == {"error"}


def test_tenants_are_isolated(tusou: Tusou, photos: list[Image.Image]) -> None:
    alice, bob = tusou.client("alice"), tusou.client("bob")
    alice.post("/v1/image/group/shared-name/new", {"data": [entry(photos[0], "a1", "alice")]})
    # Bob sees none of Alice's groups and may use the same group name for his own.
    assert bob.get("/v1/image/group").json()["result"] == []
    for resp in (
        bob.get("/v1/image/group/shared-name/info"),
        bob.get("/v1/image/group/shared-name"),
        bob.post("/v1/image/group/shared-name/image", {"id": "a1"}),
        bob.post("/v1/image/group/shared-name/add", {"data": [entry(photos[1])]}),
        bob.post("/v1/image/group/shared-name/delete", {"images": ["a1"]}),
        bob.post("/v1/image/group/shared-name/remove"),
        bob.post(
            "/v1/image/groups/search",
            {"data": {"uri": body_uri(photos[0])}, "params": {"groups": ["shared-name"]}},
        ),
        bob.post("/v1/image/group/shared-name/search", {"data": {"uri": body_uri(photos[0])}}),
    ):
        assert resp.status_code == 400 and resp.json() == {"error": "group shared-name not exists"}
    assert (
        bob.post("/v1/image/group/shared-name/new", {"data": [entry(photos[1], "b1", "bob")]}).status_code
        == 200
    )
    search = {"data": {"uri": body_uri(photos[0])}, "params": {"groups": ["shared-name"], "limit": -1}}
    assert [h["id"] for h in bob.post("/v1/image/groups/search", search).json()["result"]] == []
    assert [h["id"] for h in alice.post("/v1/image/groups/search", search).json()["result"]] == ["a1"]
    assert alice.get("/v1/image/group/shared-name/info").json() == {"count": 1}


def test_form_encoded_bodies_from_the_sdk_helpers(tusou: Tusou, client: QiniuClient, photos) -> None:
    from qiniu import QiniuMacAuth
    from qiniu.http import _get_with_qiniu_mac, _post_with_qiniu_mac, _post_with_qiniu_mac_and_headers

    mac = QiniuMacAuth(client.access_key, client.secret_key)
    base = tusou.server.url
    ret, info = _post_with_qiniu_mac_and_headers(
        base + "/v1/image/group/f/new",
        json.dumps({"data": [entry(photos[0], "f0", "form")]}),
        mac,
        {"Content-Type": "application/json"},
    )
    assert info.status_code == 200 and ret == {"errors": [None], "images": ["f0"]}, info.text_body
    ret, info = _post_with_qiniu_mac(base + "/v1/image/group/f/image", {"id": "f0"}, mac)
    assert info.status_code == 200 and ret == {"desc": "", "label": "form"}
    ret, info = _get_with_qiniu_mac(base + "/v1/image/group/f", {"limit": 1}, mac)
    assert info.status_code == 200 and [r["id"] for r in ret["result"]] == ["f0"]
    ret, info = _get_with_qiniu_mac(base + "/v1/image/group", None, mac)
    assert ret == {"code": 0, "message": "", "result": ["f"]}
    ret, info = _post_with_qiniu_mac(base + "/v1/image/group/f/delete", {"images": ["f0"]}, mac)
    assert info.status_code == 200 and ret == {}
    ret, info = _post_with_qiniu_mac(base + "/v1/image/group/f/remove", None, mac)
    assert info.status_code == 200 and ret == {}


def test_rate_limit_per_key(tmp_path, embedder) -> None:
    from tests.conftest import Tusou
    from tusou.config import Settings

    settings = Settings(data=tmp_path / "data", rate_limit_per_s=0.01, rate_limit_burst=3)
    running = Tusou(settings, embedder)
    running.server.__enter__()
    try:
        alice, bob = running.client("alice"), running.client("bob")
        assert [alice.get("/v1/image/group").status_code for _ in range(3)] == [200, 200, 200]
        limited = alice.get("/v1/image/group")
        assert limited.status_code == 429 and limited.json() == {"error": "too many requests"}
        assert limited.headers["X-Reqid"]
        # Each key has its own bucket, and unsigned requests never spend anyone's tokens.
        assert bob.get("/v1/image/group").status_code == 200
    finally:
        running.close()


def test_extensions_update_search_by_id_and_label_filter(
    client: QiniuClient, photos: list[Image.Image]
) -> None:
    """Beyond Qiniu, additive: metadata update, search with a stored image, label filter."""
    data = [entry(photos[0], "a", "shoes", {"v": 1}), entry(photos[1], "b", "bags")]
    client.post("/v1/image/group/x/new", {"data": data})
    updated = client.post("/v1/image/group/x/update", {"id": "a", "label": "boots"})
    assert updated.status_code == 200 and updated.json() == {"desc": {"v": 1}, "label": "boots"}
    assert client.post("/v1/image/group/x/update", {"id": "a", "desc": None}).json() == {
        "desc": "",
        "label": "boots",
    }
    assert client.post("/v1/image/group/x/image", {"id": "a"}).json() == {"desc": "", "label": "boots"}
    missing = client.post("/v1/image/group/x/update", {"id": "zz", "label": "q"})
    assert missing.status_code == 400 and missing.json() == {"error": "image zz not exists"}
    too_long = client.post("/v1/image/group/x/update", {"id": "a", "desc": "x" * 5000})
    assert too_long.status_code == 406 and too_long.json() == {"error": "desc too long"}

    # Search with a stored image: it finds itself, exactly.
    by_id = client.post("/v1/image/groups/search", {"data": {"id": "b"}, "params": {"groups": ["x"]}}).json()
    assert [(h["id"], h["score"] > 0.95) for h in by_id["result"]] == [("b", True)]
    gone = client.post("/v1/image/groups/search", {"data": {"id": "nope"}, "params": {"groups": ["x"]}})
    assert gone.status_code == 400 and gone.json() == {"error": "image nope not exists"}

    # Label filter: the near-duplicate of "a" is dropped when only "bags" are wanted.
    query = {"data": {"uri": body_uri(photos[0])}, "params": {"groups": ["x"], "limit": 5}}
    assert [h["id"] for h in client.post("/v1/image/groups/search", query).json()["result"]] == ["a"]
    query["params"]["labels"] = ["bags"]
    assert client.post("/v1/image/groups/search", query).json()["result"] == []
    query["params"]["labels"] = ["boots", "bags"]
    assert [h["id"] for h in client.post("/v1/image/groups/search", query).json()["result"]] == ["a"]
    query["params"]["labels"] = "boots"
    assert [h["id"] for h in client.post("/v1/image/groups/search", query).json()["result"]] == ["a"]
    query["params"]["labels"] = [1]
    assert client.post("/v1/image/groups/search", query).status_code == 406


def test_review_inputs_get_qiniu_errors_not_500(client: QiniuClient, photos: list[Image.Image]) -> None:
    client.post("/v1/image/group/r/new", {"data": []})
    uri = body_uri(photos[0])
    huge = client.session.post(
        client.base + "/v1/image/groups/search",
        data=(
            json.dumps({"data": {"uri": uri}, "params": {"groups": ["r"], "limit": 0}}).replace(
                '"limit": 0', '"limit": 1' + "0" * 400
            )
        ).encode(),
        headers={"Content-Type": "application/json"},
        auth=client.auth,
    )
    assert huge.status_code == 406 and huge.headers["X-Reqid"]
    assert huge.json() == {"error": "invalid limit: must be 1-10000, or -1 for all"}
    lone = client.session.post(
        client.base + "/v1/image/group/r/add",
        data=b'{"data": [{"uri": "x", "attribute": {"label": "\\ud800"}}]}',
        headers={"Content-Type": "application/json"},
        auth=client.auth,
    )
    assert lone.status_code == 400 and lone.json() == {"error": "invalid body"}
    # desc is measured as stored (compact JSON; a string by its own bytes): 4096 bytes fit, 4097 do not.
    ok = client.post("/v1/image/group/r/add", {"data": [entry(photos[0], "d1", desc="x" * 4096)]}).json()
    assert ok["errors"] == [None]
    compact = {"k": ["v" * 10] * 300}  # 3907 bytes compact, 4207 with json.dumps' default spaces
    assert client.post("/v1/image/group/r/add", {"data": [entry(photos[1], "d2", desc=compact)]}).json()[
        "errors"
    ] == [None]
    over = client.post("/v1/image/group/r/add", {"data": [entry(photos[2], "d3", desc="x" * 4097)]}).json()
    assert over["errors"] == [{"code": 406, "message": "desc too long"}]


def test_unknown_keys_are_refused_before_the_body_is_read(tusou: Tusou) -> None:
    import requests

    stranger = QiniuClient(tusou.server.url, "no-such-key", "whatever")
    # A declared body over the limit: a known key gets 413 after its signature... an unknown one never
    # gets that far, so the server reads nothing of it.
    headers = {"Content-Type": "application/json", "Content-Length": str(tusou.settings.max_body_bytes + 1)}
    req = requests.Request("POST", tusou.server.url + "/v1/image/group/g/new", headers=headers, data=b"{}")
    prepared = stranger.auth(req.prepare())
    prepared.headers["Content-Length"] = str(tusou.settings.max_body_bytes + 1)
    resp = stranger.session.send(prepared, timeout=10)
    assert resp.status_code == 401 and resp.json() == {"error": "bad token"}


def test_new_whose_every_image_fails_creates_no_group(client: QiniuClient) -> None:
    # A private address: refused before any connection, with the setting that would allow it named.
    body = {"data": [{"uri": "http://10.0.0.1/shoe.jpg", "attribute": {"id": "1"}}]}
    for _ in range(2):  # the same request again answers the same, not "group already exists"
        resp = client.post("/v1/image/group/first-run/new", body)
        assert resp.status_code == 200
        error = resp.json()["errors"][0]
        assert resp.json()["images"] == [""] and error["code"] == 403
        assert error["message"].startswith("fetch refused: 10.0.0.1 is not a public address")
        assert "TUSOU_FETCH_ALLOW" in error["message"]
        assert "first-run" not in client.get("/v1/image/group").json()["result"]
    # An explicitly empty group is still created, as Qiniu does.
    assert client.post("/v1/image/group/first-run/new", {"data": []}).status_code == 200
    assert client.get("/v1/image/group/first-run/info").json() == {"count": 0}


def test_invalid_limit_names_the_range(client: QiniuClient) -> None:
    assert client.post("/v1/image/group/g/new", {"data": []}).status_code == 200
    listed = client.get("/v1/image/group/g", {"limit": 1001})
    assert listed.status_code == 400 and listed.json() == {"error": "invalid limit: must be 1-1000"}
    query = {"data": {"uri": "http://10.0.0.1/x.jpg"}, "params": {"groups": ["g"], "limit": -2}}
    searched = client.post("/v1/image/groups/search", query)
    assert searched.status_code == 406
    assert searched.json() == {"error": "invalid limit: must be 1-10000, or -1 for all"}


def test_search_answers_are_the_bytes_json_renders(client: QiniuClient, photos: list[Image.Image]) -> None:
    """A search answer is written without the generic JSON renderer (a 10,000-hit answer is milliseconds of
    work): its bytes must still be exactly what that renderer writes for the same content, whatever the
    strings hold and whatever a desc is."""
    tricky = ["plain", '引号"和\\反斜杠', "tab\tnew\nline\x01\x1f", "emoji 😀 \u2028\u2029\x7f", "é", ""]
    strings = [entry(photos[0], f"t{i}", tricky[i], tricky[-1 - i]) for i in range(len(tricky))]
    assert client.post("/v1/image/group/s/new", {"data": strings}).status_code == 200
    numbers = {"p": 1e-05, "big": 12345678901234567890, "neg": -0.0, "list": [1.5, None, True], "q": "x"}
    mixed = [entry(photos[0], "n0", "num", numbers), entry(photos[0], "n1", "text", "just text")]
    assert client.post("/v1/image/group/m/new", {"data": mixed}).status_code == 200
    every = {"limit": -1}
    answers = [
        client.post("/v1/image/groups/search", {"data": {"id": "t0"}, "params": {"groups": ["s"], **every}}),
        client.post("/v1/image/groups/search", {"data": {"id": "n0"}, "params": {"groups": ["m"], **every}}),
        client.post("/v1/image/group/s/search", {"data": {"id": "t1"}, "params": every}),
    ]
    for resp in answers:
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "application/json"
        out = resp.json()
        rendered = json.dumps(out, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        assert resp.content == rendered.encode("utf-8")
    assert {h["label"] for h in answers[0].json()["result"]} == set(tricky)
    assert {h["id"]: h["desc"] for h in answers[1].json()["result"]} == {"n0": numbers, "n1": "just text"}
    assert "group" not in answers[2].json()["result"][0]


def test_search_answers_written_from_columns_are_the_hit_by_hit_answers(
    tusou: Tusou, client: QiniuClient, photos: list[Image.Image], image_server: ImageServer
) -> None:
    """The search routes write their body from the answer's columns (no object per hit): for every kind of
    search (several groups, the legacy route, filters, labels, tags, limits and thresholds at their edges)
    the bytes are those the hit-by-hit renderer (``qiniu.hits`` through ``JSONResponse``) writes for the
    same answer, and each hit carries its own image's id, label, desc and uri. A store that answers hit by
    hit (Milvus: ``Hits.of``) renders the same bytes."""
    from starlette.responses import JSONResponse

    from tusou.api import qiniu
    from tusou.domain import Matches
    from tusou.store.base import Hits

    tricky = ['引号"和\\反斜杠', "tab\tnew\nline\x01\x1f", "emoji 😀 \u2028\u2029\x7f", "", "1e-05"]
    names = ['引号"和\\反斜杠', " space ", "emoji 😀 \u2028\u2029", "", "1e-05"]  # ids: no control characters
    numbers = {"n": 1, "p": 1e-05, "big": 2**70, "s": tricky[0]}
    descs: list = ["plain", numbers, 3, -0.0, [True, None], None, ""]
    added: dict[tuple[str, str], dict] = {}
    for group, offset in (("a", 0), ("b", 3)):
        data = []
        for i in range(9):
            image_id, label, desc = f"{group}{i}{names[i % 5]}", tricky[(i + offset) % 5], descs[i % 7]
            photo = photos[i % 2]  # many hits per search: each photo nine times
            uri = image_server.put(f"{group}{i}.jpg", jpeg(photo)) if i % 3 == 0 else data_uri(jpeg(photo))
            attribute = {"id": image_id, "label": label, **({} if desc is None else {"desc": desc})}
            data.append({"uri": uri, "attribute": attribute})
            added[(group, image_id)] = {
                "label": label, "desc": "" if desc is None else desc, "uri": uri if i % 3 == 0 else None
            }
        assert client.post(f"/v1/image/group/{group}/new", {"data": data}).json()["errors"] == [None] * 9
    query_uri = data_uri(jpeg(photos[0].resize((200, 150)), 50))

    def search(data: dict, legacy: str | None = None, **params: object) -> tuple[str | None, dict]:
        return legacy, {"data": data, "params": params if legacy else {"groups": ["a", "b"], **params}}

    by_uri = {"uri": query_uri}
    searches = [
        search({"id": "a0" + names[0]}, limit=-1),
        search(by_uri, limit=10, threshold=0),
        search(by_uri, limit=1),
        (None, {"data": {"id": "b4" + names[4]}, "params": {"groups": ["b"], "limit": -1, "threshold": 0}}),
        search({"id": "a1" + names[1]}, limit=3, tags=True),
        search(by_uri, limit=-1, threshold=1),
        search(by_uri, limit=-1, labels=tricky[:2]),
        search({"id": "a2" + names[2]}, limit=-1, filter={"desc.n": {"eq": 1}}),
        search({"text": "animal"}, limit=-1, threshold=0),
        search({"id": "a3" + names[3]}, "a", limit=-1, threshold=0),
        search(by_uri, "b", limit=2, threshold=0, tags=True),
        search({"id": "a6" + names[1]}, "a", limit=1),  # every hit with a uri
    ]
    wire = qiniu.Wire(tusou.settings)
    sizes = []
    for legacy, body in searches:
        path = "/v1/image/groups/search" if legacy is None else f"/v1/image/group/{legacy}/search"
        resp = client.post(path, body)
        assert resp.status_code == 200, (body, resp.text)
        answer = tusou.service.search(client.access_key, wire.search(body, legacy))
        assert isinstance(answer, Matches)
        hit_by_hit = JSONResponse(qiniu.hits(list(answer), with_group=legacy is None)).body
        assert resp.content == hit_by_hit, body
        found = answer.hits
        as_milvus = Matches(Hits.of(list(found)), answer.scores, answer.with_tags)
        assert qiniu.hits_body(as_milvus, with_group=legacy is None) == hit_by_hit
        result = resp.json()["result"]
        sizes.append(len(result))
        for hit in result:
            group = hit.get("group", legacy)
            assert group is not None
            want = added[(group, hit["id"])]
            assert (hit["label"], hit["desc"], hit.get("uri")) == (want["label"], want["desc"], want["uri"])
            assert ("tags" in hit) == bool(body["params"].get("tags"))
        scores = [hit["score"] for hit in result]
        assert scores == sorted(scores, reverse=True)
    # Each photo's ten copies over both groups; limits cut them (1, 3, 2); none above 1; labels and a
    # filter keep a few (the keyword search's count depends on the model's tags).
    assert sizes[:8] + sizes[9:] == [10, 10, 1, 5, 3, 0, 4, 2, 4, 2, 1]


def test_answer_scores_round_as_python_rounds() -> None:
    """Scores are rounded to 7 decimals for the answer in numpy (qiniu._round7): the same floats as Python's
    round, half-way points and their neighbours included."""
    import math
    import random

    from tusou.api.qiniu import _round7

    rng = random.Random(7)
    values = [float(f"{rng.random():.9g}") for _ in range(20_000)]
    values += [(k + 0.5) / 1e7 for k in range(0, 10**7, 4999)]
    values += [k / 1e7 + 5e-8 for k in range(0, 10**7, 5003)]
    values += [v + d for v in values[-400:] for d in (-1e-16, 1e-16)]
    values += [0.0, -0.0, 1.0, 0.99999995, 1.00000005, 2.5e-7, 1e20, float("inf"), float("nan")]
    want, got = [round(v, 7) for v in values], _round7(values)
    assert len(got) == len(want)
    for w, g in zip(want, got, strict=True):
        assert (math.isnan(w) and math.isnan(g)) or (w == g and math.copysign(1, w) == math.copysign(1, g))

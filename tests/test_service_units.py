"""The service's pieces without a server: threshold choice, config references, uploads, keys, the job store and
its leases (on SQLite and on PostgreSQL)."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _service import store_url
from distill.service import auth, cascade, db, files, jobs, kinds, leases
from distill.service.cascade import choose_threshold
from distill.service.errors import ServiceError
from distill.service.refs import Resolver
from distill.service.settings import Settings, is_loopback, teachers_from_env


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    with store_url(request.param, tmp_path) as url:
        settings = Settings(data_dir=tmp_path / "data", database_url=url).prepare()
        engine = db.open_engine(settings.url, pool_size=12)
        db.ensure_schema(engine)
        yield settings, engine
        engine.dispose()


# ----------------------------------------------------------------------------------------------------------------
# Cascade threshold
# ----------------------------------------------------------------------------------------------------------------


def brute_force(confidence, agree, target):
    """Every candidate threshold tried: the lowest whose cascade agreement reaches the target."""
    best = None
    for t in sorted({*confidence.tolist(), 2.0}):
        keep = confidence >= t
        agreement = float(torch.where(keep, agree.double(), torch.ones_like(agree, dtype=torch.float64)).mean())
        if agreement >= target - 1e-12 and (best is None or t < best):
            best = t
    return best


def test_threshold_is_the_lowest_that_keeps_the_target_agreement():
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    agree = torch.tensor([True, True, False, True, False])
    every = choose_threshold(
        confidence, agree, 0.6, assurance=0.5
    )  # the point estimate; all rows to the student: 3/5 = 0.6
    assert every.threshold == pytest.approx(0.5) and every.escalation_rate == 0 and every.agreement == 0.6
    choice = choose_threshold(confidence, agree, 0.8, assurance=0.5)  # the least confident goes to the teacher: 4/5
    assert choice.threshold == pytest.approx(0.6) and choice.escalation_rate == pytest.approx(0.2)
    assert choice.agreement == pytest.approx(0.8)
    assert choose_threshold(confidence, agree, 0.9, assurance=0.5).threshold == pytest.approx(0.8)  # 0.7: 4/5 again
    exact = choose_threshold(confidence, agree, 1.0)  # every kept row agrees: no spread, the bound is the estimate
    assert exact.agreement == 1.0 and exact.escalation_rate == pytest.approx(0.6)  # only the top two stay
    assert exact.threshold == pytest.approx(0.8)


def test_threshold_matches_brute_force_with_ties():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        confidence = torch.randint(1, 8, (40,), generator=generator).float() / 8  # many ties
        agree = torch.rand(40, generator=generator) < 0.7
        target = float(torch.rand(1, generator=generator)) * 0.4 + 0.6
        choice = choose_threshold(confidence, agree, target, assurance=0.5)
        assert choice.agreement >= target - 1e-9
        expected = brute_force(confidence, agree, target)
        if expected == 2.0:
            assert choice.escalation_rate == 1.0
        else:
            assert choice.threshold == pytest.approx(expected)
        assert choice.escalation_rate == pytest.approx(float((confidence < choice.threshold).float().mean()))


@pytest.mark.parametrize("mode", ["geometric", "mean"])
def test_the_cascade_escalates_to_the_ensemble_its_student_was_distilled_from(tmp_path, mode):
    """A job's teachers combine in the cascade as they did in training: its config's ensemble mode, through the
    same `combine` as the EnsembleTeacher (a geometric ensemble is not served as an arithmetic mean)."""
    from distill import models
    from distill.config import ModelSpec
    from distill.service.refs import job_output
    from distill.teachers import EnsembleTeacher, LocalTeacher

    settings = Settings(data_dir=tmp_path / "data")
    spec, members = ModelSpec(family="mlp", width=16, depth=1), []
    for i in range(3):
        torch.manual_seed(i)
        model = models.build(spec, (8,), 4)
        models.save(model, job_output(settings, "job-1") / "models" / f"teacher-{i}", spec, (8,), 4)
        members.append(LocalTeacher(model, 4))
    job = {"id": "job-1", "kind": "recipe", "config": {"recipe": "mnist1d", "teachers": 3, "ensemble": mode}}
    inputs = torch.randn(50, 8, generator=torch.Generator().manual_seed(7)) * 3
    served = cascade.teacher_of(settings, None, job).logprobs(inputs)  # (N, C)
    trained = EnsembleTeacher(members, mode=mode)({"inputs": inputs}).logprobs  # (N, C)
    assert torch.allclose(served, trained, atol=1e-6)
    other = EnsembleTeacher(members, mode="mean" if mode == "geometric" else "geometric")({"inputs": inputs})
    assert (served - other.logprobs).abs().max() > 1e-3  # the modes differ on these inputs: the check has teeth
    with pytest.raises(ServiceError, match="unknown ensemble mode"):
        cascade.teacher_of(settings, None, {**job, "config": {"ensemble": "median"}})


# ----------------------------------------------------------------------------------------------------------------
# Settings, keys
# ----------------------------------------------------------------------------------------------------------------


def test_loopback_and_teacher_endpoints():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
    env = {"DISTILL_TEACHERS": "big=http://127.0.0.1:9000/v1/; other=https://api.example.com/v1",
           "DISTILL_TEACHER_KEY_BIG": "sk-1"}  # fmt: skip
    assert teachers_from_env(env) == {
        "big": ("http://127.0.0.1:9000/v1", "sk-1"),
        "other": ("https://api.example.com/v1", None),
    }
    with pytest.raises(Exception, match="name=http"):
        teachers_from_env({"DISTILL_TEACHERS": "big=file:///etc/passwd"})


def test_keys_are_stored_hashed_and_checked(store):
    _, engine = store
    key, record = auth.create_key(engine, ["read", "infer"], "ci")
    with db.read(engine) as connection:
        stored = connection.execute(db.api_keys.select()).one()
    assert key not in json.dumps([str(v) for v in stored]) and stored.hash == auth.hash_key(key)
    principal = auth.verify(engine, key)
    assert principal is not None and principal.allows("read") and principal.allows("infer")
    assert not principal.allows("write")
    assert auth.verify(engine, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert auth.verify(engine, "not-a-key") is None
    assert auth.revoke_key(engine, record["id"]) and auth.verify(engine, key) is None
    with pytest.raises(Exception, match="scopes"):
        auth.parse_scopes("read,root")
    assert auth.create_key(engine, ["admin"])[1]["scopes"] == ["admin"]


# ----------------------------------------------------------------------------------------------------------------
# Uploads and references
# ----------------------------------------------------------------------------------------------------------------


def upload(settings, engine, name, content: bytes):
    return files.store_upload(settings, engine, io.BytesIO(content), name, "train", "local")


def test_uploads_are_validated_and_hashed(store):
    settings, engine = store
    record = upload(settings, engine, "rows.csv", b"a,b,label\n1,2,0\n3,4,1\n")
    assert record["rows"] == 2 and record["format"] == "csv" and record["bytes"] == 22
    assert files.stored_path(settings, record).read_bytes() == b"a,b,label\n1,2,0\n3,4,1\n"
    cases = {
        "bad.jsonl": (b'{"prompt": "a"}\n{oops\n', "line 2 is not valid JSON"),
        "list.jsonl": (b"[1, 2]\n", "not an object"),
        "short.csv": (b"a,b,label\n1,2\n", "line 2 has 2 columns but the header has 3"),
        "empty.tsv": (b"a\tb\n", "no rows"),
        "latin.txt": (b"caf\xe9\n", "not UTF-8"),
        "model.pkl": (b"x", "must end in one of"),
        "pickle.npz": (_npz_with_objects(), "has dtype object; only numeric arrays are accepted"),
    }
    for name, (content, message) in cases.items():
        with pytest.raises(ServiceError) as caught:
            upload(settings, engine, name, content)
        assert caught.value.status == 422 and caught.value.param == "file" and message in caught.value.message, name
    small = Settings(data_dir=settings.data_dir, database_url=settings.database_url, max_upload_bytes=10)
    with pytest.raises(ServiceError) as caught:
        upload(small, engine, "big.txt", b"x\n" * 20)
    assert caught.value.status == 413
    assert not any(p.name.endswith(".part") for p in settings.files_dir.iterdir())


def _npz_with_objects() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
    return buffer.getvalue()


def test_config_paths_must_be_ids_inside_the_data_dir(store):
    settings, engine = store
    resolver = Resolver(settings, engine)
    data = upload(settings, engine, "train.csv", b"a,b,label\n1,2,0\n3,4,1\n5,6,0\n")
    config = kinds.parse("train", {"data": {"train": data["id"]}, "train": {"epochs": 1}}, settings, resolver)
    assert Path(config.data.train).is_relative_to(settings.data_dir.resolve())
    refused = {
        ("train", "data.train"): {"data": {"train": "/etc/passwd"}},
        ("train", "data.test"): {"data": {"train": data["id"], "test": "../distill.db"}},
        ("train", "teacher"): {"data": {"train": data["id"]}, "teacher": "/tmp/some-model"},
        ("train", "teacher.0"): {"data": {"train": data["id"]}, "teacher": ["~/m"]},
        ("train-lm", "student"): {"student": "gpt2", "data": data["id"]},
        ("train-lm", "cache"): {"data": data["id"], "cache": "/tmp/cache"},
        ("recipe", "data_dir"): {"recipe": "lm", "data_dir": "/"},
        ("recipe", "teacher"): {"recipe": "stsb", "teacher": "/root/model"},
        ("evaluate", "student"): {"student": "file-" + "0" * 24, "data": data["id"]},
    }
    for (kind, field), raw in refused.items():
        with pytest.raises(ServiceError) as caught:
            kinds.parse(kind, raw, settings, resolver)
        assert caught.value.status == 422, (kind, raw)
        assert caught.value.param.startswith(f"config.{field}"), (caught.value.param, field)


def test_config_errors_name_the_field(store):
    settings, engine = store
    resolver = Resolver(settings, engine)
    for kind, raw, field in [
        ("recipe", {"student_width": 0}, "config.student_width"),
        ("recipe", {"loss": {"temperature": -1}}, "config.loss.temperature"),
        ("recipe", {"recipe": "imagenet"}, "config.recipe"),
        ("recipe", {"typo": 1}, "config.typo"),
        ("recipe", {"recipe": "sst2"}, "config.recipe"),  # needs --datasets-dir
        ("generate", {"api": "nowhere", "model": "m", "prompts": "file-" + "1" * 24}, "config.prompts"),
        ("bogus", {}, "kind"),
    ]:
        with pytest.raises(ServiceError) as caught:
            kinds.parse(kind, raw, settings, resolver)
        assert caught.value.status == 422 and caught.value.param == field, (raw, caught.value.message)
        assert caught.value.message.startswith(field)


# ----------------------------------------------------------------------------------------------------------------
# Jobs and leases
# ----------------------------------------------------------------------------------------------------------------


def test_idempotency_cancel_retry_and_conflicts(store):
    _, engine = store
    job, created = jobs.create(engine, "recipe", {"epochs": 1}, name=None, created_by="k", idempotency_key="abc")
    again, created_again = jobs.create(
        engine, "recipe", {"epochs": 1}, name=None, created_by="k", idempotency_key="abc"
    )
    assert created and not created_again and again["id"] == job["id"]
    other, _ = jobs.create(engine, "recipe", {"epochs": 1}, name=None, created_by="k2", idempotency_key="abc")
    assert other["id"] != job["id"]  # keys are per API key
    with pytest.raises(ServiceError) as caught:
        jobs.create(engine, "recipe", {"epochs": 2}, name=None, created_by="k", idempotency_key="abc")
    assert caught.value.status == 409
    with pytest.raises(ServiceError) as caught:
        jobs.retry(engine, job["id"])
    assert caught.value.status == 409  # queued: nothing to retry
    assert jobs.cancel(engine, job["id"])["status"] == "cancelled"
    with pytest.raises(ServiceError) as caught:
        jobs.cancel(engine, job["id"])
    assert caught.value.status == 409
    assert jobs.retry(engine, job["id"])["status"] == "queued"
    for call in (jobs.get, jobs.cancel, jobs.retry):
        with pytest.raises(ServiceError) as caught:
            call(engine, "job-" + "f" * 24)
        assert caught.value.status == 404
    kinds_seen = [(e["kind"], e["data"].get("status")) for e in jobs.events(engine, job["id"])[0]]
    assert kinds_seen == [("status", "queued"), ("status", "cancelled"), ("status", "queued")]


def test_concurrent_claims_take_each_job_once(store):
    _, engine = store
    created = [jobs.create(engine, "recipe", {"seed": i}, name=None, created_by="k", idempotency_key=None)[0]["id"]
               for i in range(12)]  # fmt: skip
    taken: list[tuple[str, str]] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while (claim := leases.claim(engine, name, 60, 3)) is not None:
            with lock:
                taken.append((claim.job_id, name))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(job for job, _ in taken) == sorted(created)  # every job once, none twice


def test_expired_lease_is_reclaimed_and_fenced(store):
    _, engine = store
    job, _ = jobs.create(engine, "recipe", {}, name=None, created_by="k", idempotency_key=None)
    first = leases.claim(engine, "a", 0.3, 2)
    assert first is not None and first.attempt == 1
    assert leases.claim(engine, "b", 0.3, 2) is None  # the lease still holds
    assert leases.heartbeat(engine, job["id"], first.token, 0.3) is False
    time.sleep(0.4)
    second = leases.claim(engine, "b", 0.3, 2)
    assert second is not None and second.attempt == 2 and second.token != first.token
    # the first worker lost the job: nothing it writes counts
    assert leases.heartbeat(engine, job["id"], first.token, 10) is None
    assert not leases.record(engine, job["id"], first.token, [("progress", {"done": 1})], ("x", 1, 2))
    assert not leases.finish(engine, job["id"], first.token, "succeeded")
    assert leases.heartbeat(engine, job["id"], second.token, 0.3) is False
    time.sleep(0.4)
    assert leases.claim(engine, "c", 0.3, 2) is None  # two attempts used: the job fails instead
    final = jobs.get(engine, job["id"])
    assert final["status"] == "failed" and "stopped responding 2 times" in final["error"]
    kinds_seen = [e["kind"] for e in jobs.events(engine, job["id"])[0]]
    assert kinds_seen.count("lease_expired") == 2 and kinds_seen[-1] == "status"


def test_cancel_reaches_the_worker_or_ends_an_orphaned_job(store):
    _, engine = store
    job, _ = jobs.create(engine, "recipe", {}, name=None, created_by="k", idempotency_key=None)
    claim = leases.claim(engine, "a", 0.3, 3)
    assert claim is not None
    assert jobs.cancel(engine, job["id"])["cancel_requested"]
    assert leases.heartbeat(engine, job["id"], claim.token, 0.3) is True  # the owner learns it at its next beat
    time.sleep(0.4)  # ... but it died first: whoever finds the expired job ends it instead of running it again
    assert leases.claim(engine, "b", 0.3, 3) is None
    final = jobs.get(engine, job["id"])
    assert final["status"] == "cancelled" and final["attempts"] == 1


def test_schema_version_is_checked(store):
    _, engine = store
    assert db.ensure_schema(engine) == db.SCHEMA_VERSION  # idempotent
    with db.write(engine) as connection:
        connection.execute(db.schema_info.update().values(version=db.SCHEMA_VERSION + 1))
    with pytest.raises(Exception, match="newer distill"):
        db.ensure_schema(engine)
    with pytest.raises(Exception, match="expects"):
        db.check_schema(engine)

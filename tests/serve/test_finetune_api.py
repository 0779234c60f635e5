"""Fine-tuning as a service: the official `openai` client drives files and jobs over loopback.

Oracles: a job's fine-tuned model must answer exactly as transformers' `generate` does with the
job's saved adapter merged into a fresh copy of the base (`reference_tokens`); the served base model
must keep every weight bit for bit, during and after a job; a request served while a job trains must
equal the base model's own greedy reply.
"""

from __future__ import annotations

import copy
import errno
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from serve_helpers import chat_model, chat_tokenizer, loopback_server, reference_tokens

from tuneforge.adapters.model import adapter_names
from tuneforge.eval.generation import PromptFormat
from tuneforge.data import Message
from tuneforge.serve.adapters import AdapterManager
from tuneforge.serve.api import create_app
from tuneforge.serve.engine import Engine
from tuneforge.serve.finetune.coserve import CoservePolicy
from tuneforge.serve.finetune.jobs import FineTuningService

BASE = "tiny-base"
ADMIN = "admin-key"
USER = "user-key"
POLL_SECONDS = 120


def chat_lines(count: int) -> bytes:
    lines = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                      {"role": "assistant", "content": f"{i + 1}"}]}) for i in range(count)]
    return ("\n".join(lines) + "\n").encode()


class Server:
    def __init__(self, state_dir, share: float = 0.5):
        self.tokenizer = chat_tokenizer()
        self.model = chat_model(self.tokenizer)
        # The base as built, before any job ran: a reference built later could race a job's thread for
        # torch's global generator and come out different.
        self.pristine = copy.deepcopy(self.model).eval()
        self.manager = AdapterManager(self.model, None)
        self.engine = Engine(self.model, self.tokenizer, adapters=self.manager)
        self.finetune = FineTuningService(state_dir, self.engine, self.manager, BASE, CoservePolicy(share=share))
        self.app = create_app(self.engine, self.manager, BASE, api_key=USER, admin_key=ADMIN, finetune=self.finetune)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    served = Server(tmp_path_factory.mktemp("state"))
    with loopback_server(served.app) as url:
        served.url = url
        served.client = openai.OpenAI(base_url=f"{url}/v1", api_key=ADMIN, max_retries=0, timeout=60)
        yield served
    torch.set_num_threads(threads)


def wait_for(client, job_id: str, statuses=("succeeded", "failed", "cancelled")):
    deadline = time.monotonic() + POLL_SECONDS
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {statuses}; last status {job.status}")


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's tensors by their plain names (a served adapter wraps layers: `.base_layer.`)."""
    return {name.replace(".base_layer", ""): value.detach().clone() for name, value in model.state_dict().items()
            if ".adapters." not in name}


def prompt_ids(tokenizer, text: str) -> list[int]:
    return PromptFormat.for_tokenizer("auto", tokenizer).encode([Message("user", text)], tokenizer)


def base_logprobs(model, prompt: list[int], generated: list[int]) -> list[float]:
    """log p(token | everything before it) under a copy of the base, for each generated token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()  # (T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    return [float(log_probs[len(prompt) - 1 + i, token]) for i, token in enumerate(generated)]


def test_upload_train_poll_chat_and_events_through_the_openai_client(server):
    client = server.client
    fresh_base = chat_model(server.tokenizer).state_dict()
    uploaded = client.files.create(file=("train.jsonl", chat_lines(12)), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune"
    assert client.files.retrieve(uploaded.id).bytes == len(chat_lines(12))
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=uploaded.id, suffix="unit",
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10})
    assert job.status in ("queued", "running")
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "ft-unit"
    rendered = [server.tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
                for line in chat_lines(12).decode().splitlines()]
    assert done.trained_tokens == 2 * sum(len(server.tokenizer(text)["input_ids"]) for text in rendered)  # 2 epochs
    assert "ft-unit" in [model.id for model in client.models.list().data]

    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "What is 3 + 1?"}])
    adapter_dir = server.finetune.models_dir / "ft-unit"
    expected = reference_tokens(server.tokenizer, prompt_ids(server.tokenizer, "What is 3 + 1?"), 8, adapter_dir)
    assert reply.choices[0].message.content == server.tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.completion_tokens == len(expected)

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [event.message for event in events]
    assert "The job has successfully completed" in messages
    assert any(message.startswith("Step 6:") for message in messages)  # 12 examples / 4 per step x 2 epochs
    [checkpoint] = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.fine_tuned_model_checkpoint == "ft-unit" and checkpoint.step_number == 6
    assert job.id in [listed.id for listed in client.fine_tuning.jobs.list().data]

    # One copy of the base, unchanged bit for bit; the job's adapter is gone from the served model.
    served = base_weights(server.model)
    assert served.keys() == fresh_base.keys()
    for name, value in served.items():
        assert torch.equal(value, fresh_base[name]), name
    with server.engine.lock:
        assert "default" not in adapter_names(server.model)

    # A restarted server (same state directory) lists the job and serves its model again.
    restarted = Server(server.finetune.state_dir)
    assert restarted.finetune.get(job.id)["fine_tuned_model"] == "ft-unit"
    assert "ft-unit" in restarted.manager.available()
    assert restarted.finetune.events(job.id)["data"][0]["message"] == "The job has successfully completed"


def test_a_malformed_upload_names_its_bad_lines(server):
    bad = chat_lines(2) + b'{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n' + b"[" * 100_000 + b"\n"
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    message = caught.value.body["message"]
    assert "line 3" in message and "assistant" in message and "line 4" in message and "not valid JSON" in message
    assert "line 5: not valid JSON (nested too deeply" in message
    assert not server.finetune.files.list() or all(f["filename"] != "bad.jsonl" for f in server.finetune.files.list())
    with pytest.raises(openai.BadRequestError, match="purpose"):
        server.client.files.create(file=("x.jsonl", chat_lines(1)), purpose="assistants")


def test_bad_job_requests_get_clear_errors_and_the_server_stays_up(server):
    client = server.client
    file_id = client.files.create(file=("t.jsonl", chat_lines(4)), purpose="fine-tune").id
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.fine_tuning.jobs.create(model="gpt-4o", training_file=file_id)
    with pytest.raises(openai.NotFoundError, match="no file"):
        client.fine_tuning.jobs.create(model=BASE, training_file="file-" + "0" * 24)
    for hyper in ({"n_epochs": 0}, {"batch_size": 100000}, {"learning_rate_multiplier": -1}):
        with pytest.raises(openai.BadRequestError, match=next(iter(hyper))):
            client.fine_tuning.jobs.create(model=BASE, training_file=file_id, hyperparameters=hyper)
    with pytest.raises(openai.BadRequestError, match="adapter_method"):
        client.fine_tuning.jobs.create(model=BASE, training_file=file_id, metadata={"adapter_method": "prefix-tuning"})
    with pytest.raises(openai.BadRequestError, match="metadata.r"):
        client.fine_tuning.jobs.create(model=BASE, training_file=file_id, metadata={"r": "0"})

    first = client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="twin",
                                           hyperparameters={"n_epochs": 1, "batch_size": 4})
    with pytest.raises(openai.ConflictError, match="twin"):
        client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="twin")
    assert wait_for(client, first.id).status == "succeeded"
    with pytest.raises(openai.ConflictError, match="already succeeded"):
        client.fine_tuning.jobs.cancel(first.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-" + "0" * 24)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_full_disk_fails_the_job_alone(server, monkeypatch):
    import tuneforge.train.loop as loop

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "save_adapter", full_disk)
    before = base_weights(server.model)
    file_id = server.client.files.create(file=("t.jsonl", chat_lines(4)), purpose="fine-tune").id
    job = server.client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="full",
                                                hyperparameters={"n_epochs": 1, "batch_size": 4})
    failed = wait_for(server.client, job.id)
    assert failed.status == "failed" and failed.error.code == "disk_full"
    assert "disk" in failed.error.message and "full" in failed.error.message
    monkeypatch.undo()
    for name, value in base_weights(server.model).items():
        assert torch.equal(value, before[name]), name
    reply = server.client.chat.completions.create(model=BASE, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert "ft-full" not in [model.id for model in server.client.models.list().data]


def test_cancelling_a_running_job_frees_its_adapter(server):
    file_id = server.client.files.create(file=("t.jsonl", chat_lines(64)), purpose="fine-tune").id
    job = server.client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="stopme",
                                                hyperparameters={"n_epochs": 50, "batch_size": 1})
    wait_for(server.client, job.id, statuses=("running",))
    behind = server.client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="behind",
                                                   hyperparameters={"n_epochs": 1, "batch_size": 4})
    assert server.client.fine_tuning.jobs.retrieve(behind.id).status == "queued"  # one job trains at a time
    assert server.client.fine_tuning.jobs.cancel(behind.id).status == "cancelled"
    cancelled = server.client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    assert wait_for(server.client, job.id).status == "cancelled"
    with server.engine.lock:
        assert "default" not in adapter_names(server.model)
    assert not (server.finetune.jobs_dir / job.id / "run").exists()
    # Cancelled jobs free their suffix too.
    server.client.fine_tuning.jobs.cancel(server.client.fine_tuning.jobs.create(
        model=BASE, training_file=file_id, suffix="stopme", hyperparameters={"n_epochs": 50, "batch_size": 1}).id)


def test_requests_complete_while_a_job_trains_and_match_the_base(server):
    client = server.client
    # The reference is the pristine copy of the served base (taken before any job ran): building a fresh
    # base here would draw from torch's global generator while an earlier job's thread may still draw too.
    prompt = prompt_ids(server.tokenizer, "Hello")
    expected_ids = reference_tokens(server.tokenizer, prompt, 6, base=server.pristine)
    expected = server.tokenizer.decode(expected_ids, skip_special_tokens=True)
    expected_logprobs = base_logprobs(server.pristine, prompt, expected_ids)
    # A request before the job, so the engine has listed the model's layers before the job wraps more.
    client.chat.completions.create(model=BASE, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    file_id = client.files.create(file=("t.jsonl", chat_lines(64)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="busy",
                                         hyperparameters={"n_epochs": 50, "batch_size": 1,
                                                          "learning_rate_multiplier": 10})
    wait_for(client, job.id, statuses=("running",))
    time.sleep(1.0)  # some steps first, so a job adapter leaking into served rows would show
    replies, errors = [], []

    def ask():
        try:
            replies.append(client.chat.completions.create(model=BASE, max_tokens=6, temperature=0, logprobs=True,
                                                          messages=[{"role": "user", "content": "Hello"}]))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(60)
    still = client.fine_tuning.jobs.retrieve(job.id).status
    client.fine_tuning.jobs.cancel(job.id)
    assert not errors and len(replies) == 4
    assert still == "running", "the job must still have been training while the requests were served"
    assert [reply.choices[0].message.content for reply in replies] == [expected] * 4
    for reply in replies:  # the base model's own probabilities: no trace of the job's adapter
        served = [entry.logprob for entry in reply.choices[0].logprobs.content]
        assert served == pytest.approx(expected_logprobs, abs=1e-4)
    assert wait_for(client, job.id).status == "cancelled"


def test_finetuning_routes_need_the_admin_key(server):
    for key, status in ((None, 401), (USER, 403)):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(f"{server.url}/v1/fine_tuning/jobs", headers=headers).status_code == status
        assert httpx.post(f"{server.url}/v1/files", headers=headers).status_code == status


def test_a_restart_fails_the_job_that_was_running_and_queues_the_waiting_ones(tmp_path):
    from tuneforge.serve.finetune.files import Upload
    from tuneforge.serve.finetune.jobs import JobSpec

    first = Server(tmp_path)  # its worker never starts: the jobs stay as recorded
    file_id = first.finetune.files.add(Upload("t.jsonl", chat_lines(2), "fine-tune"))["id"]
    running = first.finetune.create(JobSpec(BASE, file_id, None, "was-running", 1, 1, 1.0, 0))["id"]
    waiting = first.finetune.create(JobSpec(BASE, file_id, None, "waiting", 1, 1, 1.0, 0))["id"]
    record = first.finetune.jobs_dir / running / "job.json"
    record.write_text(record.read_text().replace('"status": "queued"', '"status": "running"'))

    again = Server(tmp_path).finetune
    assert again.get(running)["status"] == "failed"
    assert again.get(running)["error"]["code"] == "server_restarted"
    assert again.get(waiting)["status"] == "queued" and again._queue.get_nowait() == waiting
    assert again.files.get(file_id)["bytes"] == len(chat_lines(2))


def test_a_job_running_when_the_server_stops_is_recorded_as_failed(tmp_path):
    from tuneforge.serve.finetune.files import Upload
    from tuneforge.serve.finetune.jobs import JobSpec

    served = Server(tmp_path)
    file_id = served.finetune.files.add(Upload("t.jsonl", chat_lines(32), "fine-tune"))["id"]
    job_id = served.finetune.create(JobSpec(BASE, file_id, None, "long", 50, 1, 1.0, 0))["id"]
    served.engine.start()
    served.finetune.start()
    try:
        deadline = time.monotonic() + POLL_SECONDS
        while served.finetune.get(job_id)["status"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        served.finetune.stop()
        served.engine.stop()
    job = served.finetune.get(job_id)
    assert (job["status"], job["error"]["code"]) == ("failed", "server_stopped")
    assert "default" not in adapter_names(served.model)

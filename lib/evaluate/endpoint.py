"""Answers from a running OpenAI-compatible server (``slurmtune serve``, or any such endpoint)
instead of a model loaded here: ``slurmtune predict --endpoint`` and ``eval.endpoint``.

::

    client = EndpointClient("http://127.0.0.1:8000/v1", "slurmtune/r1", key=None, concurrency=4)
    answers = client.answers(records, max_new_tokens=256)   # in the records' order

Chat prompts go to ``/chat/completions`` as the turns the model's template renders (passages
folded into their turn, as training and ``predict`` render them), plain prompts to
``/completions``; decoding is greedy (temperature 0). A failed request is one line naming the
record, the status and what the server said.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from slurmtune.data.chat_format import to_template_messages
from slurmtune.errors import SlurmtuneError

TIMEOUT_S = 600  # one answer of a large model on a busy server


class EndpointClient:
    def __init__(self, url: str, model: str, key: str | None = None, concurrency: int = 4):
        self.url, self.model, self.key, self.concurrency = url.rstrip("/"), model, key, max(1, concurrency)

    def answers(self, records: list[dict], max_new_tokens: int) -> list[str]:
        from slurmtune.evaluate.generate import eval_prompt

        def one(numbered: tuple[int, dict]) -> str:
            n, record = numbered
            prompt = eval_prompt(record)
            if isinstance(prompt, str):
                body = {"prompt": prompt}
                path, pick = "/completions", lambda r: r["choices"][0]["text"]
            else:
                body = {"messages": to_template_messages(prompt),
                        **({"tools": record["tools"]} if record.get("tools") else {})}
                path, pick = "/chat/completions", lambda r: r["choices"][0]["message"].get("content") or ""
            reply = self.post(path, {"model": self.model, "max_tokens": max_new_tokens, "temperature": 0, **body},
                              f"record {n + 1}")
            return pick(reply).strip()

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, enumerate(records)))

    def post(self, path: str, body: dict, what: str) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            said = e.read()[:300].decode("utf-8", "replace").strip()
            raise SlurmtuneError(f"{self.url}{path}: {what}: HTTP {e.code} from the server: {said}") from None
        except (urllib.error.URLError, OSError) as e:
            raise SlurmtuneError(f"{self.url}{path}: {what}: no answer ({getattr(e, 'reason', e)}); is the "
                                 "server up? (slurmtune serve status RUN)") from None

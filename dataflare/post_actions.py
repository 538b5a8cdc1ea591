"""Post-actions: what a workflow does after each run (``post_actions:``).

Each action's ``condition`` is an expression over ``workflow.status`` (``success | failed |
stopped``), ``workflow.id``, ``workflow.name`` and ``run.summary`` (``run.id`` too); with no
condition the action always runs. ``notification`` renders ``message`` (a ``{{path}}``
template over the same names) and delivers it (:mod:`dataflare.notify`); ``webhook`` POSTs the
run's context to ``config.url``; ``trigger`` starts ``config.workflow`` through the callback
the runner gives (``wait: true`` waits for it and reports its status). Every action's outcome
is returned, to be printed or stored with the run; none is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dataflare import notify
from dataflare.expr import compile_expression
from dataflare.template import compile_template

STATUS = {"succeeded": "success", "failed": "failed", "stopped": "stopped"}

# trigger(workflow id, wait) -> (ok, description)
Trigger = Callable[[str, bool], tuple[bool, str]]


def context(workflow: Any, status: str, run_id: str | None,
            summary: dict[str, Any] | None) -> dict[str, Any]:
    """The names conditions and messages see."""
    return {
        "workflow": {"status": STATUS.get(status, status), "id": workflow.id,
                     "name": workflow.name or workflow.id},
        "run": {"id": run_id, "status": STATUS.get(status, status), "summary": summary or {}},
    }


def run_post_actions(workflow: Any, status: str, run_id: str | None,
                     summary: dict[str, Any] | None, trigger: Trigger | None,
                     attempts: int = 3) -> list[dict[str, Any]]:
    """Execute the workflow's post-actions for a run that ended with ``status``."""
    ctx = context(workflow, status, run_id, summary)
    results: list[dict[str, Any]] = []
    for i, action in enumerate(workflow.post_actions):
        out: dict[str, Any] = {"index": i, "type": action.type}
        if action.condition and not compile_expression(action.condition).test(ctx):
            out.update(done=False, reason="condition is false")
            results.append(out)
            continue
        config = dict(action.config)
        if action.type == "notification":
            message = compile_template(str(config.get("message", "")))(ctx)
            subject = compile_template(str(config.get(
                "subject", "DataFlare: {{workflow.name}} {{workflow.status}}")))(ctx)
            d = notify.send(config, subject, message, ctx, attempts=attempts)
            out.update(done=d.ok, channel=d.channel, attempts=d.attempts, error=d.error)
        elif action.type == "webhook":
            d = notify.send({**config, "channel": "webhook"}, "run ended",
                            compile_template(str(config.get("message", "")))(ctx), ctx,
                            attempts=attempts)
            out.update(done=d.ok, attempts=d.attempts, error=d.error)
        else:  # trigger
            target = str(config.get("workflow", ""))
            if trigger is None:
                out.update(done=False, error="triggering a workflow needs the server "
                           "(dataflare server, or dataflare run --server URL)")
            elif not target:
                out.update(done=False, error="a trigger needs 'workflow'")
            else:
                ok, text = trigger(target, bool(config.get("wait", False)))
                out.update(done=ok, workflow=target, result=text)
        results.append(out)
    return results

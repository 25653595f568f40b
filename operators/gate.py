"""The cost gate: a pipeline's `approve_above_usd` puts this task between `plan` and the first
stage group.

It is the standard provider's `ApprovalOperator` with the plan's bill as its subject and
body. At or below the threshold it returns at once (nobody is asked, no HITL request is
written). Above it the request is written and the task waits for a person — in Airflow 3.3+
in the `awaiting_input` state, holding no worker slot, pool slot or trigger — in the UI's
Required Actions or through the REST API. Approve: the run goes on. Reject: the voxflow run
is ended `cancelled` and the task fails (no retry), so every later task is upstream_failed:
nothing is published, no worker group starts and finalize announces no asset. A rejection
is a failed DAG run on purpose: the pipeline's output was not made, and whoever reads the
run's state (a backfill, a monitor) must not take it for made. Clearing the DAG run plans it
again and asks again.

Airflow 3.3.2 may lose an answer given within seconds of the request on a loaded machine (the
executor reports the parked process's exit after the resumed one started; the scheduler
retries the task): the retry asks again. Nothing runs without an answer; the gate has
`ASK_RETRIES` tries more than the DAG's default, so a lost answer costs a re-ask, not the run.
"""
from __future__ import annotations

from typing import Any

from airflow.providers.standard.exceptions import HITLRejectException
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk.exceptions import AirflowFailException

from .pipeline import PLAN_TASK, end_run

GATE_TASK = "approve_cost"


def usd(dollars: float) -> str:
    """Dollars as the gate shows them: cents, or two significant digits below a cent (a test
    volume's bill is a fraction of a cent, and "$0.00" would hide it)."""
    return f"${dollars:,.2f}" if dollars >= 0.01 or dollars == 0 else f"${dollars:.2g}"


def _hours(hours: float) -> str:
    return f"{hours:,.1f}" if hours >= 10 else f"{hours:.3g}"


def estimate_text(bill: dict, info: dict, threshold: float) -> tuple[str, str]:
    """The approval request's subject and Markdown body from the plan's XCom (`info`):
    dollars total and per output teravoxel, tasks per stage, worker-hours per kind."""
    from voxflow.cli import bill_lines
    from voxflow.config import RunConfig
    config = RunConfig.model_validate_json(info["config"])
    d = bill["dollars"]
    subject = (f"Approve {usd(d['total'])} for {config.output}? (over approve_above_usd "
               f"{usd(threshold)})")
    tasks = "\n".join(f"| {stage} | {n:,} |" for stage, n in bill["tasks"].items())
    hours = "\n".join(f"| {kind} | {_hours(h)} | {usd(d.get(kind + '_workers', 0.0))} |"
                      for kind, h in bill["worker_hours"].items())
    body = "\n".join([
        f"The plan estimates **{usd(d['total'])}** for this run "
        f"({usd(d['per_output_teravoxel'])} per output teravoxel, "
        f"{info['voxels'] / 1e12:.3g} teravoxels), above this pipeline's `approve_above_usd` "
        f"of {usd(threshold)}. Prices of {bill['prices_date']}.",
        "",
        f"- input `{config.input}`, output `{config.output}`",
        f"- voxflow run `{info['run']}`, model digest `{info['model_digest']}`",
        "",
        "| stage | tasks |", "|---|---:|", tasks,
        "",
        "| workers | worker-hours | dollars |", "|---|---:|---:|", hours,
        "",
        "**Approve** publishes the tasks and starts the workers. **Reject** ends the run: "
        "nothing is published and no worker starts.",
        "",
        "```", *bill_lines(bill), "```",
    ])
    return subject, body


ASK_RETRIES = 6        # re-asks after a lost answer (a reject fails without retrying)


class CostGateOperator(ApprovalOperator):
    """Ask a person to approve a run whose plan estimate is above `approve_above_usd`; pass at
    once at or below it. Reject ends the run with nothing published (module docstring)."""

    ui_color = "#fff4e5"

    def __init__(self, *, approve_above_usd: float, **kwargs: Any) -> None:
        # fail_on_reject: every later task is upstream_failed and the DAG run fails (Airflow's
        # default skips only the next task, and the later groups' publish run on none_failed)
        kwargs.setdefault("subject", "Approve this voxflow run's estimated cost")
        kwargs.setdefault("retries", ASK_RETRIES)
        super().__init__(fail_on_reject=True, **kwargs)
        self.approve_above_usd = approve_above_usd

    def execute(self, context: Any) -> Any:
        info = context["ti"].xcom_pull(task_ids=PLAN_TASK)
        if not info or "bill" not in info:
            raise AirflowFailException("the plan task left no bill (did it fail?)")
        total = info["bill"]["dollars"]["total"]
        if total <= self.approve_above_usd:
            self.log.info("estimate %s is within approve_above_usd %s: nobody is asked",
                          usd(total), usd(self.approve_above_usd))
            return {"approved": True, "asked": False, "estimate_usd": total,
                    "approve_above_usd": self.approve_above_usd}
        self.subject, self.body = estimate_text(info["bill"], info, self.approve_above_usd)
        self.log.info("estimate %s is above approve_above_usd %s: waiting for approval",
                      usd(total), usd(self.approve_above_usd))
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        try:
            return super().execute_complete(context, event)
        except HITLRejectException:
            end_run(context, "cancelled")        # the queue's run: nothing waits for it
            who = (event.get("responded_by_user") or {}).get("name", "someone")
            # AirflowFailException: no retry (a retry would ask again)
            raise AirflowFailException(f"rejected by {who}: the run is cancelled, nothing "
                                       "was published") from None

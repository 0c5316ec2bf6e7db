"""The rules' HQ command: ``alert.ack`` acknowledges an open alert, as ``POST /api/alerts/{id}/ack`` does."""

from __future__ import annotations

from cloud_bridge.commands import AlertAck, CommandError, Handler, Outcome, Request, command_key
from gateway.kernel.events import AlertAcknowledged
from gateway.kernel.journal import Journal
from gateway.kernel.journal.reader import snapshot
from rules.acks import acknowledge
from rules.engine import open_alerts


def rule_handlers(journal: Journal) -> dict[str, Handler]:
    db_uri = journal.path.absolute().as_uri() + "?mode=ro"

    async def ack(request: Request) -> Outcome:
        args = request.args
        assert isinstance(args, AlertAck)
        with snapshot(db_uri) as conn:
            open_ids = {a["alert_id"] for a in open_alerts(conn)}
        if args.alert_id not in open_ids:
            raise CommandError("invalid_args", f"no open alert {args.alert_id[:200]!r} on this gateway")
        event = AlertAcknowledged(alert_id=args.alert_id, note=args.note, role=args.role, via="hq")
        seq = await acknowledge(journal, event, command_key(request.request_id))
        return ("ok" if seq is not None else "duplicate"), {"alert_id": args.alert_id, "seq": seq}

    return {"alert.ack": Handler(ack)}

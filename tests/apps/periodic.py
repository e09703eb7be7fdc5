"""An app with periodic jobs, for in-process workers and `baton worker` processes."""

from __future__ import annotations

import baton

app = baton.Baton()


@app.step(cron="* * * * * *", args={"label": "every second"})
async def beat(label: str) -> str:
    return label


@app.step
async def report(period: str) -> str:
    return period


app.schedule(report.new(period="hourly"), cron="0 * * * *", timezone="Europe/Paris",
             name="report-hourly")
app.schedule(report.new(period="daily"), cron="30 6 * * *", timezone="America/New_York",
             name="report-daily")

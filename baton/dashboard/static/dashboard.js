// baton dashboard: confirmations for dangerous actions, and live workflow pages.
// Everything received is user data: it is only ever set with textContent and attributes,
// never parsed as HTML.
"use strict";

const FINAL = new Set(["completed", "discarded", "cancelled"]);
const RANK = {pending: 0, scheduled: 1, available: 1, executing: 2, snoozed: 2,
              retryable: 3, completed: 4, discarded: 4, cancelled: 4};

function confirmations() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

function live(url) {
  // Steps by name: the drawing's boxes and the table's rows.
  const steps = new Map();
  for (const el of document.querySelectorAll("[data-step]")) {
    const name = el.dataset.step;
    if (!steps.has(name)) steps.set(name, {els: [], job: null, attempt: -1, rank: -1});
    steps.get(name).els.push(el);
  }
  const badge = document.getElementById("wf-state");
  const progress = document.getElementById("wf-progress");
  const status = document.getElementById("live");

  function setWorkflowState(state) {
    if (!badge) return;
    badge.textContent = state;
    badge.className = "state state-" + state;
  }

  function countSettled() {
    if (!progress) return;
    let settled = 0;
    for (const step of steps.values()) if (FINAL.has(step.state)) settled += 1;
    progress.textContent = settled + " / " + steps.size;
  }

  function clock(timestamp) {
    const at = new Date(timestamp);
    return Number.isNaN(at.getTime()) ? "" : at.toISOString().slice(11, 19);
  }

  function stamp(name, state, timestamp) {
    const step = steps.get(name);
    if (!step || !timestamp) return;
    for (const el of step.els) {
      const started = el.querySelector(".cell-started");
      const finished = el.querySelector(".cell-finished");
      if (state === "executing" && started) {
        started.textContent = clock(timestamp);
        if (finished) finished.textContent = "-";
      } else if (FINAL.has(state) && finished) {
        finished.textContent = clock(timestamp);
      }
    }
  }

  function show(name, state, attempt, error) {
    const step = steps.get(name);
    if (!step) {
      const grew = document.getElementById("grew");
      if (grew) grew.hidden = false;
      return;
    }
    step.state = state;
    for (const el of step.els) {
      el.dataset.state = state || "unknown";
      const text = el.querySelector(".step-state");
      if (text) text.textContent = state;
      const cell = el.querySelector(".cell-state .state");
      if (cell) {
        cell.textContent = state;
        cell.className = "state state-" + state;
      }
      const tries = el.querySelector(".cell-attempt");
      if (tries && attempt !== null && attempt !== undefined) {
        const max = tries.textContent.split("/")[1];
        tries.textContent = attempt + " /" + (max === undefined ? "" : max);
      }
      const err = el.querySelector(".cell-error");
      if (err && error !== undefined) err.textContent = error || "";
    }
  }

  // A snapshot is the truth when read; an event applies unless it is older than what is
  // shown (an earlier attempt, or a step going back from a later state of its attempt).
  function apply(name, state, attempt, job, error, force) {
    const step = steps.get(name);
    const rank = RANK[state] === undefined ? -1 : RANK[state];
    if (step && !force) {
      const older = (step.job === job) && (attempt < step.attempt ||
                    (attempt === step.attempt && rank < step.rank));
      if (older) return;
    }
    if (step) {
      step.job = job;
      step.attempt = attempt === null ? -1 : attempt;
      step.rank = rank;
    }
    show(name, state, attempt, error);
  }

  const source = new EventSource(url);
  source.addEventListener("open", () => { status.textContent = "live"; });
  source.addEventListener("error", () => { status.textContent = "reconnecting…"; });
  source.addEventListener("snapshot", (message) => {
    const data = JSON.parse(message.data);
    for (const s of data.steps) apply(s.step_name, s.state, s.attempt, s.job_id, s.error, true);
    setWorkflowState(data.workflow.state);
    countSettled();
    status.textContent = "live";
  });
  source.addEventListener("workflow_step_updated", (message) => {
    const e = JSON.parse(message.data);
    apply(e.step_name, e.state, e.attempt, e.job_id, e.error, false);
    if (steps.has(e.step_name) && steps.get(e.step_name).state === e.state) {
      stamp(e.step_name, e.state, e.timestamp);
    }
    countSettled();
  });
  source.addEventListener("workflow_finished", (message) => {
    setWorkflowState(JSON.parse(message.data).outcome);
  });
  source.addEventListener("workflow_resumed", (message) => {
    const e = JSON.parse(message.data);
    for (const name of e.steps) {
      const step = steps.get(name);
      if (step) { step.rank = -1; }
      show(name, "available", null, "");
    }
    setWorkflowState("running");
    countSettled();
  });
  window.addEventListener("pagehide", () => source.close());
}

document.addEventListener("DOMContentLoaded", () => {
  confirmations();
  const url = document.body.dataset.events;
  if (url) live(url);
});

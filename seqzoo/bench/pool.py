"""The worker pool of ``seqzoo compare``: spawned processes that train prepared runs
(``seqzoo.bench.runs``), so that a comparison uses every core with one thread per run."""

from __future__ import annotations

import signal

import torch

from .runs import train_run
from .train import Interrupted

__all__ = ["Pool", "worker"]


class Pool:
    """``jobs`` spawned worker processes that train prepared runs; ``submit`` one, ``get`` the next result.
    However the comparison ends (Ctrl-C, SIGTERM, an error), ``close`` stops every worker started."""

    def __init__(self, jobs: int, threads: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.todo, self.done = ctx.Queue(), ctx.Queue()
        self.workers = []
        self.waiting: set = set()
        self.dead = False
        try:
            for _ in range(jobs):
                self.workers.append(ctx.Process(target=worker, args=(self.todo, self.done, threads), daemon=True))
                self.workers[-1].start()
        except BaseException:
            self.close()
            raise

    def submit(self, key, spec: dict) -> None:
        self.waiting.add(key)
        if self.dead:  # the workers died: what is left fails with the reason, the comparison ends cleanly
            self.done.put((key, {"status": "failed", "error": "training worker process died"}))
        else:
            self.todo.put((key, spec))

    def get(self):
        import queue

        while True:
            try:
                key, rec = self.done.get(timeout=0.5)
            except queue.Empty:
                if any(w.is_alive() for w in self.workers):
                    continue
                try:  # a last result may have arrived as the last worker exited
                    key, rec = self.done.get(timeout=1.0)
                except queue.Empty:
                    self.dead = True
                    key = next(iter(self.waiting))
                    rec = {"status": "failed", "error": "training worker process died"}
            self.waiting.discard(key)
            return key, rec

    def close(self) -> None:
        for _ in self.workers:
            self.todo.put(None)
        started = [w for w in self.workers if w.pid is not None]  # an interrupt may land inside start()
        for w in started:
            w.join(timeout=0.2)
            if w.is_alive():
                w.terminate()
        for w in started:
            w.join()
        self.todo.cancel_join_thread()
        self.done.cancel_join_thread()


def worker(todo, done, threads: int) -> None:
    """A training worker: runs prepared specs until the stop mark. The parent stops the workers on
    Ctrl-C / SIGTERM (and keeps only the runs that finished); a Ctrl-C that reaches the worker between
    runs is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        while (item := todo.get()) is not None:
            key, spec = item
            done.put((key, train_run(spec)))
    except (KeyboardInterrupt, Interrupted):  # a Ctrl-C during a run (training handles it): stop quietly
        return

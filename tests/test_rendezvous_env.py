"""A process that made its own one-process world (opt_ds does when no launcher set one) holds a store on
MASTER_PORT; a child started from it must not inherit that rendezvous, or its own world tries to bind the
same port (EADDRINUSE) or joins the parent's. Every child opt_ds and its tests start gets a clean one."""
from multiproc import child_env
from opt_ds.bench.suite import worker_env
from opt_ds.parallel.layout import ParallelLayout
from opt_ds.ports import RENDEZVOUS_VARIABLES


def test_children_of_a_process_with_its_own_world_get_no_rendezvous():
    import os
    ParallelLayout(1, 1, 1).initialize()
    assert {"RANK", "WORLD_SIZE", "MASTER_PORT"} <= set(os.environ), "the one-process world is env:// based"
    for env in (worker_env(1), worker_env(4, tensor=2), child_env()):
        assert not RENDEZVOUS_VARIABLES & set(env)

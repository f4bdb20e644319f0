"""The live autoscaler: autoscaler/core's policy driven by a real clock against real runtime pods.

    nodes       NodeSpec (a runtime pod and its declared resources), NodeSource
    observe     pure: pod statuses -> ClusterSnapshot and the activator's RouteTable
    admin       the runtime admin API client that executes Load / Unload / Evict
    controller  the reconcile loop (the one owner of the autoscaler's state)
    api         the HTTP API: route table long-poll, demand, functions, status
    local       the embedded driver: runtime pods as child processes, restarted when they die
    mesh        the embedded mesh: pods + autoscaler + activator on one event loop (`slinfer up`)
    cli         `slinfer up | deploy | delete | list | invoke | logs`
"""

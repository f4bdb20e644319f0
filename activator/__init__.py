"""The data plane: receives HTTP and CloudEvents, finds (or waits for) an instance, relays answers.

    routes     the route table it receives from the autoscaler (RouteSource seam), RouteView
    dispatch   instance choice: the busiest instance that admits; else wait (WaitingRoom)
    waiting    bounded per-function waiting room (QueueFull), demand reports to the autoscaler
    upstream   keep-alive HTTP/1.1 client to runtime pods (asyncio + httptools)
    relay      SSE pass-through and continuation of preempted requests on another instance
    events     CloudEvents in (binary / structured) and the reply event out
    metrics    Prometheus metrics
    app        the ASGI app: probes, routing, error shapes, wiring
"""

"""`cme chaos`: a bounded, seeded soak on 127.0.0.1 that kills, stalls and restarts the stack's
processes while traders send orders, then checks every order's fate against a replay.

- schedule: the seeded fault schedule (pure);
- procs: the processes (Redis, two matchers, two gateways, two feeds) and the supervisor loop;
- flow: the seeded order messages and the reconnecting, resuming WebSocket traders;
- checks: the orders-stream tap, the replay through a fresh Engine, and the checks against it;
- runner: the soak from start to summary (`run(args)` for the command line).
"""

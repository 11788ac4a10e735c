"""Multi-process runtimes. PPLL: one process per local module (:mod:`.ppll`)."""

"""How every tool reaches the sites of a patched model: find them (`locate`), scope hooks to the
thread that opened a block (`scope`), record values (`capture`), edit them and split a prefill at
positions (`edit`). The public names are `gdn_intervene.capture`, `intervene` and `state_at`.

This package's `__init__` imports nothing, so the core (`layer`) may import `hooking.scope`
without an import cycle through the package.
"""

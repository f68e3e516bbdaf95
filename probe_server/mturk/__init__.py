"""The MTurk requester side: experiment files, publishing, sync, review, a fake MTurk.

``experiment`` reads the experiment file, ``fees`` prices it, ``requester``
runs the workflow over aioboto3, and ``fake`` is a local stand-in for MTurk
(its requester API and the worker site's externalSubmit) for rehearsals.
"""

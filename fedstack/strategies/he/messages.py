"""The vocabulary the HE server strategy and the HE client mod share: record keys, error codes.

Kept apart from both sides so neither imports the other. Every error reason a client sends
under these codes is a fixed sentence: nothing in it depends on the client's data or on the
numbers it decrypted (those stay in the client's own log).
"""

from __future__ import annotations

#: ConfigRecord the server adds to train/evaluate messages.
HE_RECORD = "he"
#: Keys in it: the key fingerprint clients must hold; a simulated run's secret-context path.
FINGERPRINT_KEY = "fingerprint"
SIMULATION_SECRET_KEY = "simulation-secret-context"

#: A check request (an evaluate message the mod answers itself, without evaluating): its
#: kind, the round, the node ids whose replies the group sums, and every reply of the round.
CHECK_KEY = "check"
CHECK_MODEL = "model"  # the round's new global model (every client may decrypt it)
CHECK_GROUP = "group"  # a sum over a group of the round's replies (group testing)
CHECK_ROUND_KEY = "check-round"
CHECK_MEMBERS_KEY = "check-members"
CHECK_REPLIES_KEY = "check-replies"
#: The reply's ConfigRecord and its one key: whether the decrypted sum passed its checks.
CHECK_REPLY_RECORD = "he-check"
CHECK_OK_KEY = "ok"

#: Error codes of HE replies a client could not produce.
HE_KEY_ERROR_CODE = 4020
HE_CIPHERTEXT_ERROR_CODE = 4021
HE_ENCRYPT_ERROR_CODE = 4022
#: The global model decrypts but fails its check slots or bounds (a bad reply was summed).
HE_UNDECRYPTABLE_CODE = 4023
#: A check request the client refuses (it breaks the client's own group-testing rules).
HE_CHECK_REFUSED_CODE = 4024

UNDECRYPTABLE_REASON = (
    "the encrypted global model fails its integrity check (check slots or bounds): a summed "
    "reply was random, corrupted, made under another key or out of bounds"
)
ENCRYPT_REASON = (
    "cannot encrypt the update: it is not finite or outside aggregation.max_abs_value / "
    "aggregation.max_weight (details in the client's log)"
)

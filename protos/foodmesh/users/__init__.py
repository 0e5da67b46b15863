"""The users API: accounts, logins and the keys that verify their tokens."""

"""What a connection is and what it proves, for every listener (the HTTP API and KMS v2): the
listening sockets, Unix peer credentials, mTLS, and the identity each open connection proved."""

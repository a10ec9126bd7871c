//! Bitbucket Cloud REST client.

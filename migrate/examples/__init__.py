"""
Demo applications that run out of the box under C{twistd migrate-host}.

  - L{migrate.examples.chat}: a line-based chat server whose connections
    carry their state to new code (it provides
    L{migrate.interfaces.IMigratable}).  It is the default application.
  - L{migrate.examples.echo}: a plain echo server that knows nothing about
    migrate; under gradual transfer its connections finish on the old code.
"""

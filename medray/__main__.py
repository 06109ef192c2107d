from medray.cli import main

raise SystemExit(main())

<#
.SYNOPSIS
    Install the X-on relay agent as a Windows service.

.DESCRIPTION
    Run from an elevated PowerShell (Run as administrator) on the office PC, after installing
    Python 3.11+ for all users and the agent into it:

        py -3.11 -m pip install xon-relay pywin32

    The script:
      1. creates the data directory (default %PROGRAMDATA%\xon-relay-agent) readable only by
         SYSTEM, Administrators and the service account (LocalService), and optionally by the
         account that runs the local apps (-TokenReader), which need the local token;
      2. enrolls the agent when -Code is given (the one-time code from the relay operator);
      3. installs the service with `xon-relay-agent service install` (automatic start,
         LocalService account);
      4. sets the recovery actions (restart after 5 s, 10 s, 30 s; count reset after a day);
      5. starts the service, and runs `xon-relay-agent doctor`.

    Uninstall: python -m relay_agent service uninstall   (the data directory is kept).

.EXAMPLE
    .\install-agent-service.ps1 -Relay https://relay.example.com -Code 3f9c... -TokenReader "OFFICE\reception"
#>
[CmdletBinding()]
param(
    # The relay's public URL (https://...), needed with -Code.
    [string]$Relay,
    # One-time enrollment code; without it the directory must already hold an enrollment.
    [string]$Code,
    # python.exe of a system-wide installation (not a virtual environment) with xon-relay and pywin32.
    [string]$Python = (Get-Command python.exe -ErrorAction SilentlyContinue).Source,
    [string]$DataDir = (Join-Path $env:ProgramData "xon-relay-agent"),
    # Account (DOMAIN\user or a group) allowed to read the local token, for the local apps.
    [string]$TokenReader,
    [string]$ServiceName = "XonRelayAgent"
)

Set-StrictMode -Version Latest
$ErrorActionPreference = "Stop"

function Invoke-Checked {
    # Run a native command; stop with its exit code on failure (native commands do not throw).
    param([string]$What, [scriptblock]$Command)
    & $Command
    if ($LASTEXITCODE -ne 0) {
        throw "$What failed (exit code $LASTEXITCODE)"
    }
}

$principal = New-Object Security.Principal.WindowsPrincipal(
    [Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw "Run this script from an elevated PowerShell (Run as administrator)."
}
if (-not $Python -or -not (Test-Path $Python)) {
    throw "python.exe not found: pass -Python C:\Path\To\python.exe"
}

# 1. The data directory: inheritance off, full control for SYSTEM (S-1-5-18) and
#    Administrators (S-1-5-32-544), modify for LocalService (S-1-5-19). SIDs, not names, so the
#    script works on any Windows display language.
New-Item -ItemType Directory -Force -Path $DataDir | Out-Null
Invoke-Checked "icacls (data directory)" {
    icacls $DataDir /inheritance:r /grant:r "*S-1-5-18:(OI)(CI)F" "*S-1-5-32-544:(OI)(CI)F" "*S-1-5-19:(OI)(CI)M" | Out-Null
}

# 2. Enrollment (makes the key pair, registers it, writes config.toml and local-token).
if ($Code) {
    if (-not $Relay) { throw "-Code needs -Relay https://..." }
    Invoke-Checked "enrollment" {
        & $Python -m relay_agent enroll --relay $Relay --code $Code --data-dir $DataDir
    }
} elseif (-not (Test-Path (Join-Path $DataDir "agent.key"))) {
    throw "$DataDir holds no enrollment: pass -Relay and -Code"
}

if ($TokenReader) {
    Invoke-Checked "icacls (local token)" {
        icacls (Join-Path $DataDir "local-token") /grant "${TokenReader}:R" | Out-Null
    }
}

# 3. The service: python.exe -m relay_agent.winservice --data-dir $DataDir, automatic start.
Invoke-Checked "service install" {
    & $Python -m relay_agent service install --name $ServiceName --python $Python --data-dir $DataDir
}

# 4. Recovery on failure. `service install` sets the same; repeating it here keeps the policy
#    visible in this script and repairs a service installed by an older version.
Invoke-Checked "sc.exe failure" {
    sc.exe failure $ServiceName reset= 86400 actions= restart/5000/restart/10000/restart/30000
}
Invoke-Checked "sc.exe failureflag" { sc.exe failureflag $ServiceName 1 }

# 5. Start, then check.
Invoke-Checked "service start" { & $Python -m relay_agent service start --name $ServiceName }
& $Python -m relay_agent doctor --data-dir $DataDir
Write-Host "Installed and started service $ServiceName (data in $DataDir, log in $DataDir\agent.log)."

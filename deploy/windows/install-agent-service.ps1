<#
.SYNOPSIS
    Install the X-on relay agent as a Windows service (a thin wrapper around the executable).

.DESCRIPTION
    Everything here is also one command of xon-relay-agent.exe (docs/install-agent.md); this
    script only runs them in order. From an elevated PowerShell (Run as administrator), with
    xon-relay-agent.exe already copied to C:\Program Files\xon-relay-agent\:

      1. xon-relay-agent.exe service install: registers the executable as the service
         XonRelayAgent (automatic start, LocalService, restart on failure), gives the service
         account its data directory and writes -Proxy and -CaFile into its config;
      2. xon-relay-agent.exe enroll, when -Code is given (the one-time code from the relay
         operator);
      3. read access to local-token for -TokenReader, the account that runs the local apps;
      4. xon-relay-agent.exe service start, then doctor --service (checks as the service runs).

    Uninstall: & "C:\Program Files\xon-relay-agent\xon-relay-agent.exe" service uninstall
    (the data directory is kept).

.EXAMPLE
    .\install-agent-service.ps1 -Relay https://relay.example.com -Code 3f9c... -TokenReader "OFFICE\reception"
#>
[CmdletBinding()]
param(
    # The relay's public URL (https://...), needed with -Code.
    [string]$Relay,
    # One-time enrollment code; without it the directory must already hold an enrollment.
    [string]$Code,
    [string]$Exe = (Join-Path $env:ProgramFiles "xon-relay-agent\xon-relay-agent.exe"),
    [string]$DataDir = (Join-Path $env:ProgramData "xon-relay-agent"),
    # HTTP proxy the service uses (LocalService does not see a user's proxy settings).
    [string]$Proxy,
    # PEM file of a TLS-inspecting proxy's CA; copied into the data directory.
    [string]$CaFile,
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

if (-not (Test-Path $Exe)) {
    throw "$Exe not found: copy xon-relay-agent.exe there first, or pass -Exe"
}

$install = @("service", "install", "--name", $ServiceName, "--data-dir", $DataDir)
if ($PSBoundParameters.ContainsKey("Proxy")) { $install += @("--proxy", $Proxy) }
if ($CaFile) { $install += @("--ca-file", $CaFile) }
Invoke-Checked "service install" { & $Exe @install }

if ($Code) {
    if (-not $Relay) { throw "-Code needs -Relay https://..." }
    Invoke-Checked "enrollment" { & $Exe enroll --relay $Relay --code $Code --data-dir $DataDir }
} elseif (-not (Test-Path (Join-Path $DataDir "agent.key"))) {
    throw "$DataDir holds no enrollment: pass -Relay and -Code"
}

if ($TokenReader) {
    Invoke-Checked "icacls (local token)" {
        icacls (Join-Path $DataDir "local-token") /grant "${TokenReader}:R" | Out-Null
    }
}

Invoke-Checked "service start" { & $Exe service start --name $ServiceName }
& $Exe doctor --service $ServiceName
Write-Host "Installed and started service $ServiceName (data in $DataDir, log in $DataDir\agent.log)."
